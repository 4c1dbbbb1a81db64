#!/usr/bin/env bash
# The whole test suite: installs the official Python SDKs (OpenAI, Anthropic, Google GenAI)
# in a virtual environment under target/, then runs every Rust test, the SDK scenario included,
# and then the soak on its own.
set -euo pipefail
cd "$(dirname "$0")/.."
# The OAuth pages' test (tests/api/pages.rs) drives headless Chromium through chromedriver.
for tool in chromium chromedriver; do
    if ! command -v "$tool" >/dev/null 2>&1; then
        echo "scripts/test.sh: $tool is not on the PATH; the OAuth pages' browser test needs it." >&2
        echo "  Debian/Ubuntu: sudo apt-get install -y chromium chromium-driver" >&2
        exit 1
    fi
done
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
