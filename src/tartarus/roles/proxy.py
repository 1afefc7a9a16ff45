"""Forwarding a call to an agent without holding it: request and response bodies stream through in both
directions as they arrive (exec's NDJSON events, file uploads and downloads of any size), and a WebSocket
(the terminal) is bridged frame by frame, its close code and reason passed on.

The caller's `Authorization` never reaches the agent: the gateway replaces it with the agent token and
names the caller it authenticated in `x-tartarus-caller`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import httpx
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.websockets import WebSocket, WebSocketDisconnect
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

from tartarus.cluster.model import Reservation
from tartarus.daemon.asgi import error_response
from tartarus.daemon.auth import Principal
from tartarus.errors import TartarusError
from tartarus.roles import caller
from tartarus.roles.token import AgentToken

log = logging.getLogger(__name__)

# Hop-by-hop headers (RFC 9110 7.6.1) and the ones the gateway sets itself.
_DROP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "host",
        "authorization",
        caller.CALLER_HEADER,
    }
)
_WS_DROP = _DROP | {
    "sec-websocket-key",
    "sec-websocket-version",
    "sec-websocket-extensions",
    "sec-websocket-protocol",
    "content-length",
}


class NodeUnreachable(TartarusError):
    """The agent that owns the sandbox did not answer (connection refused, reset, timed out)."""

    code = "node_unreachable"
    status = 503


class Answered(Exception):
    """An agent's answer that ends the gateway's request as it is (a client error, a capture that fails
    its checks): passed on, never retried on another node."""

    def __init__(self, response: httpx.Response) -> None:
        super().__init__(response.status_code)
        self.response = response


# One call to a reserved node's agent that makes a sandbox there (a create, a copy of a checkpoint).
AgentCall = Callable[[Reservation], httpx.Response]


@dataclass(frozen=True)
class Target:
    """Where a call goes: an agent's address, and the node's name for errors."""

    node: str
    address: str


def agent_headers(token: AgentToken, principal: Principal) -> dict[str, str]:
    return {"authorization": token.header, caller.CALLER_HEADER: caller.encode(principal)}


class Proxy:
    def __init__(self, token: AgentToken, client: httpx.AsyncClient) -> None:
        self.token = token
        self.client = client

    def _unreachable(self, target: Target, e: Exception) -> NodeUnreachable:
        return NodeUnreachable(
            f"node {target.node} ({target.address}) did not answer: {type(e).__name__}: {e}"
        )

    async def forward(self, request: Request, target: Target, principal: Principal) -> Response:
        """The agent's answer to this request, streamed back as it comes."""
        headers = [(k, v) for k, v in request.headers.items() if k not in _DROP]
        headers += list(agent_headers(self.token, principal).items())
        has_body = "content-length" in request.headers or "transfer-encoding" in request.headers
        upstream = self.client.build_request(
            request.method,
            httpx.URL(f"http://{target.address}{request.url.path}", query=request.url.query.encode()),
            headers=headers,
            content=request.stream() if has_body else None,
        )
        try:
            response = await self.client.send(upstream, stream=True)
        except httpx.TransportError as e:
            raise self._unreachable(target, e) from e
        kept = {k: v for k, v in response.headers.items() if k not in _DROP}
        return StreamingResponse(_relay(response), status_code=response.status_code, headers=kept)

    async def fetch(
        self,
        target: Target,
        principal: Principal,
        method: str,
        path: str,
        *,
        query: bytes = b"",
        body: bytes = b"",
    ) -> httpx.Response:
        """A whole (small) answer from one agent: listings, the create call."""
        try:
            return await self.client.request(
                method,
                httpx.URL(f"http://{target.address}{path}", query=query),
                headers=agent_headers(self.token, principal),
                content=body or None,
            )
        except httpx.TransportError as e:
            raise self._unreachable(target, e) from e

    async def bridge(self, websocket: WebSocket, target: Target, principal: Principal) -> None:
        """Open the same WebSocket on the agent, then pass frames both ways until either side closes.

        The agent refusing the handshake (no such sandbox, a command that cannot start) is passed on as
        the same HTTP response refusing the client's handshake."""
        url = f"ws://{target.address}{websocket.url.path}"
        if websocket.url.query:
            url += f"?{websocket.url.query}"
        headers = [(k, v) for k, v in websocket.headers.items() if k not in _WS_DROP]
        headers += list(agent_headers(self.token, principal).items())
        subprotocols = websocket.scope.get("subprotocols") or None
        try:
            upstream = await connect(
                url, additional_headers=headers, subprotocols=subprotocols, max_size=None, open_timeout=30
            )
        except InvalidStatus as e:
            answer = e.response
            await websocket.send_denial_response(
                Response(
                    answer.body or b"",
                    answer.status_code,
                    media_type=answer.headers.get("content-type", "application/json"),
                )
            )
            return
        except (OSError, InvalidHandshake, TimeoutError) as e:
            await websocket.send_denial_response(error_response(self._unreachable(target, e)))
            return
        async with upstream:
            await websocket.accept(subprotocol=upstream.subprotocol)
            await _pump(websocket, upstream)


async def _relay(response: httpx.Response) -> AsyncIterator[bytes]:
    """The agent's body as its bytes arrive (not decoded: the encoding passes through); the upstream
    connection is closed when the client leaves too."""
    try:
        async for chunk in response.aiter_raw():
            yield chunk
    finally:
        await response.aclose()


async def _pump(client: WebSocket, upstream: ClientConnection) -> None:
    async def to_agent() -> None:
        while True:
            message = await client.receive()
            if message["type"] == "websocket.disconnect":
                await upstream.close(message.get("code", 1000), message.get("reason") or "")
                return
            if message.get("bytes") is not None:
                await upstream.send(message["bytes"])
            elif message.get("text") is not None:
                await upstream.send(message["text"])

    async def to_client() -> None:
        try:
            async for frame in upstream:
                if isinstance(frame, bytes):
                    await client.send_bytes(frame)
                else:
                    await client.send_text(frame)
        except ConnectionClosed:
            pass
        close = upstream.protocol.close_rcvd
        with contextlib.suppress(RuntimeError, OSError, WebSocketDisconnect):
            await client.close(close.code if close else 1000, close.reason if close else None)

    tasks = [asyncio.create_task(to_agent()), asyncio.create_task(to_client())]
    try:
        done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for task in pending:
            task.cancel()
        for task in done:
            with contextlib.suppress(ConnectionClosed, WebSocketDisconnect, RuntimeError, OSError):
                task.result()
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
