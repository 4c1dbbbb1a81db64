#!/usr/bin/env bash
# The whole test suite: installs the official Python SDKs (OpenAI, Anthropic, Google GenAI)
# in a virtual environment under target/, then runs every Rust test, the SDK scenario included,
# and then the soak on its own.
set -euo pipefail
cd "$(dirname "$0")/.."
# Debian packages the tests need, installed when missing (with sudo when not root).
apt_install() {
    if ! command -v apt-get >/dev/null 2>&1; then
        echo "scripts/test.sh: the tests need $* (Debian/Ubuntu package names); install them first" >&2
        exit 1
    fi
    local sudo_cmd=""
    if [ "$(id -u)" != 0 ]; then sudo_cmd="sudo"; fi
    echo "scripts/test.sh: installing $*" >&2
    $sudo_cmd env DEBIAN_FRONTEND=noninteractive apt-get update -q
    $sudo_cmd env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$@"
}
# The OAuth pages' test (tests/api/pages.rs) drives headless Chromium through chromedriver.
if ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1; then
    apt_install chromium chromium-driver
fi
# The SDK scenario's virtual environment (Debian splits venv out of python3).
if ! python3 -c 'import venv, ensurepip' >/dev/null 2>&1; then
    apt_install python3-venv
fi
venv=target/sdk-venv
if ! "$venv/bin/python" -c 'import openai, anthropic, google.genai' 2>/dev/null \
    || ! cmp -s tests/sdk/requirements.txt "$venv/requirements.txt"; then
    rm -rf "$venv"
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check -r tests/sdk/requirements.txt
    cp tests/sdk/requirements.txt "$venv/requirements.txt"
fi
export CLIPROXY_SDK_PYTHON="$PWD/$venv/bin/python"
cargo test --features sdk-tests "$@"
# The soak (tests/api/soak.rs, #[ignore]d) loads the machine for 15 s: it runs alone, after
# everything else, in the same test binary.
cargo test --features sdk-tests --test api -- --ignored soak
