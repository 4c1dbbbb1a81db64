-- wrk script: a small non-streaming chat completion.
wrk.method = "POST"
wrk.body = '{"model":"gpt-4o-mini","max_tokens":20,"messages":[{"role":"user","content":"Say hello."}]}'
wrk.headers["Content-Type"] = "application/json"
