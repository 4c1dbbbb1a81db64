"""The official OpenAI, Anthropic and Google GenAI SDKs, unchanged, pointed at cliproxyapi.

Usage: scenario.py BASE_URL CLIENT_KEY. Runs a non-streaming and a streaming call with each
SDK and prints one JSON line per call; exits non-zero on the first failure.
"""

import json
import sys

import anthropic
import openai
from google import genai
from google.genai import types

base, key = sys.argv[1], sys.argv[2]
PROMPT = "Say hello to the mock provider, please."


def report(name, text):
    if not text or "tok" not in text and "hello" not in text:
        raise SystemExit(f"{name}: unexpected answer {text!r}")
    print(json.dumps({"call": name, "text": text}), flush=True)


oa = openai.OpenAI(base_url=f"{base}/v1", api_key=key, max_retries=0)
r = oa.chat.completions.create(model="gpt-4o-mini", max_tokens=20, messages=[{"role": "user", "content": PROMPT}])
report("openai", r.choices[0].message.content)
assert r.usage is not None and r.usage.prompt_tokens > 0
chunks = oa.chat.completions.create(
    model="gpt-4o-mini", max_tokens=20, stream=True, messages=[{"role": "user", "content": PROMPT}]
)
text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
report("openai-stream", text)
models = oa.models.list()
assert any(m.id == "gpt-*" for m in models.data), models

an = anthropic.Anthropic(base_url=base, api_key=key, max_retries=0)
m = an.messages.create(model="claude-sonnet-4-5", max_tokens=20, messages=[{"role": "user", "content": PROMPT}])
report("anthropic", m.content[0].text)
assert m.usage.input_tokens > 0
with an.messages.stream(model="claude-sonnet-4-5", max_tokens=20, messages=[{"role": "user", "content": PROMPT}]) as s:
    final = s.get_final_message()
report("anthropic-stream", "".join(b.text for b in final.content if b.type == "text"))
assert final.usage.output_tokens > 0

gg = genai.Client(api_key=key, http_options=types.HttpOptions(base_url=base))
cfg = types.GenerateContentConfig(max_output_tokens=20)
g = gg.models.generate_content(model="gemini-2.5-flash", contents=PROMPT, config=cfg)
report("gemini", g.text)
text = "".join(c.text or "" for c in gg.models.generate_content_stream(model="gemini-2.5-flash", contents=PROMPT, config=cfg))
report("gemini-stream", text)
