"""The coordinator's only public listener: Flower's Fleet API and nothing else.

Flower 1.41's SuperLink serves its Fleet API (what SuperNodes use), its Control API
(``flwr run``, ``flwr supernode register``, ``flwr stop``) and the ServerApp's runtime
API on one HTTP port, and Flower's open-source Control API has no authentication:
whoever reaches that port can register a node key of their own, stop the job, or
submit a Flower app that the coordinator runs and every node executes. Flower has no
option to keep the Control API off the network, so privmed binds the SuperLink to
loopback and runs this gateway on the public address instead. It terminates TLS with
the federation's certificate and forwards exactly the Fleet routes
(``POST /v1/fleet/<name>``, names from Flower's ``FleetHttpClient``) to the SuperLink;
any other request gets 404 and one log line. SuperNode authentication is unchanged:
the SuperLink checks the signed headers, which pass through untouched.

Run as ``python -m privmed.federation.fleet_gateway``; :class:`Coordinator` starts it.
"""

from __future__ import annotations

import argparse
import ssl
import sys
from typing import Any

# The routes of flwr.supernode.fleet_http_client.FleetHttpClient (Flower 1.41).
FLEET_ROUTES = frozenset({
    "register-node", "activate-node", "deactivate-node", "unregister-node",
    "send-node-heartbeat", "pull-messages", "push-messages", "get-run", "get-fab",
    "push-object", "pull-object", "confirm-message-received"})
# Flower sends array chunks of at most 5 MiB per request; this leaves ample room while
# keeping an unauthenticated sender from filling the coordinator's memory.
MAX_BODY = 64 * 1024 * 1024
_HOP = {b"host", b"connection", b"keep-alive", b"transfer-encoding", b"te", b"trailer",
        b"upgrade", b"proxy-authorization", b"proxy-connection", b"content-length"}
_NOT_FOUND = b'{"detail":"Not Found"}'


class FleetGateway:
    """ASGI app forwarding the Fleet routes to ``upstream`` (the SuperLink on loopback)."""

    def __init__(self, upstream: str, upstream_ca: str | None) -> None:
        self.upstream, self.upstream_ca = upstream.rstrip("/"), upstream_ca
        self.client: Any = None

    def _client(self) -> Any:
        import httpx

        if self.client is None:
            verify: ssl.SSLContext | bool = False
            if self.upstream_ca:
                verify = ssl.create_default_context(cafile=self.upstream_ca)
            self.client = httpx.AsyncClient(base_url=self.upstream, verify=verify,
                                            timeout=httpx.Timeout(120.0, connect=10.0))
        return self.client

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            if self.client is not None:
                await self.client.aclose()
            await send({"type": "lifespan.shutdown.complete"})
            return
        if scope["type"] != "http":
            return
        path, method = scope["path"], scope["method"]
        route = path[len("/v1/fleet/"):] if path.startswith("/v1/fleet/") else ""
        # An exact match, not a prefix: '/v1/fleet/../control/...' must not get through.
        if method != "POST" or route not in FLEET_ROUTES or scope.get("query_string"):
            client = (scope.get("client") or ("?", 0))[0]
            print(f"[gateway] refused {method} {path[:200]!r} from {client}", flush=True)
            await _respond(send, 404, _NOT_FOUND, [(b"content-type", b"application/json")])
            return
        body = bytearray()
        while True:
            event = await receive()
            body += event.get("body", b"")
            if len(body) > MAX_BODY:
                await _respond(send, 413, b'{"detail":"Request too large"}',
                               [(b"content-type", b"application/json")])
                return
            if not event.get("more_body"):
                break
        headers = [(k, v) for k, v in scope["headers"] if k.lower() not in _HOP]
        import httpx

        try:
            reply = await self._client().post(f"/v1/fleet/{route}", content=bytes(body),
                                              headers=headers)
        except httpx.TransportError:
            # 503 is what Flower's SuperNode retries: the SuperLink is restarting or busy.
            await _respond(send, 503, b'{"detail":"SuperLink unavailable"}',
                           [(b"content-type", b"application/json")])
            return
        out = [(k, v) for k, v in reply.headers.raw
               if k.lower() not in _HOP and k.lower() != b"content-encoding"]
        await _respond(send, reply.status_code, reply.content, out)


async def _respond(send: Any, status: int, body: bytes,
                   headers: list[tuple[bytes, bytes]]) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [*headers, (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True, help="The SuperLink, e.g. "
                        "https://127.0.0.1:9093.")
    parser.add_argument("--upstream-ca", help="CA of the SuperLink's loopback certificate.")
    parser.add_argument("--certfile", help="The federation's server.pem (no TLS without).")
    parser.add_argument("--keyfile", help="Its server.key.")
    args = parser.parse_args(argv)
    import uvicorn

    print(f"[gateway] forwarding the Fleet API on {args.host}:{args.port} to {args.upstream}"
          + ("" if args.certfile else " WITHOUT TLS"), flush=True)
    uvicorn.run(FleetGateway(args.upstream, args.upstream_ca), host=args.host, port=args.port,
                ssl_certfile=args.certfile, ssl_keyfile=args.keyfile, log_level="warning",
                access_log=False, lifespan="on", server_header=False)
    sys.exit(0)


if __name__ == "__main__":
    main()
