-- wrk script for the OpenAI cases (bench/run.py): POST /v1/chat/completions of a small chat
-- request, stream false, to every server alike (the fixed upstream, LiteLLM's proxy, aibackend).
-- The Authorization header is LiteLLM's master_key; the others ignore it.
wrk.method = "POST"
wrk.body = '{"model": "fixed", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 16}'
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer sk-bench"
