#!/usr/bin/env python3
"""
The Python peer of the benchmark: a minimal aiohttp reverse proxy in front of one model.

    python bench/aiohttp_proxy.py --port 8081 --upstream http://127.0.0.1:8080

One process, asyncio's default event loop (not uvloop: aibackend runs on Twisted's default
epoll reactor, so this is the like-for-like peer), one ClientSession with one
TCPConnector(limit=...) reused for every request. Any method and path: the request body is
POSTed to the upstream (same path and query), and its status and body come back as JSON.
With --stream (the benchmark's streaming cases), the answer is relayed piece by piece as it
arrives instead (a StreamResponse, chunked), with the upstream's Content-Type. No access log.
"""

import argparse

from aiohttp import ClientSession, ClientTimeout, TCPConnector, web

UPSTREAM = web.AppKey("upstream", str)
SESSION = web.AppKey("session", ClientSession)


async def forward(request: web.Request) -> web.Response:
    body = await request.read()
    session = request.app[SESSION]
    async with session.post(
        request.app[UPSTREAM] + request.rel_url.path_qs,
        data=body,
        headers={"Content-Type": "application/json"},
    ) as answer:
        data = await answer.read()
        return web.Response(status=answer.status, body=data, content_type="application/json")


async def forward_stream(request: web.Request) -> web.StreamResponse:
    """With --stream: the upstream's answer relayed piece by piece as it arrives (chunked)."""
    body = await request.read()
    session = request.app[SESSION]
    async with session.post(
        request.app[UPSTREAM] + request.rel_url.path_qs,
        data=body,
        headers={"Content-Type": "application/json"},
    ) as answer:
        response = web.StreamResponse(status=answer.status, headers={
            "Content-Type": answer.headers.get("Content-Type", "application/json"), "Cache-Control": "no-cache"})
        await response.prepare(request)
        async for data in answer.content.iter_any():
            await response.write(data)
        await response.write_eof()
        return response


def make_app(upstream: str, limit: int, stream: bool = False) -> web.Application:
    app = web.Application()
    app[UPSTREAM] = upstream.rstrip("/")

    async def session_context(app):
        connector = TCPConnector(limit=limit, limit_per_host=limit, keepalive_timeout=120)
        async with ClientSession(connector=connector, timeout=ClientTimeout(total=60)) as session:
            app[SESSION] = session
            yield

    app.cleanup_ctx.append(session_context)
    app.router.add_route("*", "/{tail:.*}", forward_stream if stream else forward)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True, help="the model's base URL, e.g. http://127.0.0.1:8080")
    parser.add_argument("--limit", type=int, default=64, help="the connector's connection limit (default 64)")
    parser.add_argument("--stream", action="store_true",
                        help="relay each answer piece by piece as it arrives (the streaming cases)")
    args = parser.parse_args()
    web.run_app(make_app(args.upstream, args.limit, args.stream), host=args.host, port=args.port,
                access_log=None, print=None, backlog=4096)


if __name__ == "__main__":
    main()
