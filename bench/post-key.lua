-- wrk script of the policy case (aibackend-http-policy): post.lua's POST, with a client key.
wrk.method = "POST"
wrk.body = '{"text": "hello"}'
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer bench-client-key-0123456789"
