-- wrk script for every benchmark case: a POST of a small JSON body.
-- The path comes from the URL given to wrk (aibackend: /post/predict?id=MODEL;
-- nginx and the aiohttp proxy accept any path).
wrk.method = "POST"
wrk.body = '{"text": "hello"}'
wrk.headers["Content-Type"] = "application/json"
