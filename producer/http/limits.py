"""Request size limits: a body over the limit is refused with 413 before it is read whole.

An ASGI middleware, so it sees the declared Content-Length and every chunk of a chunked body,
and no route can forget it. The job list's length is limited by the jobs route itself.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from producer.http.errors import ApiError, error_response


def too_large(what: str, limit: int, unit: str) -> ApiError:
    return ApiError(
        413,
        f"{what} is over the server's limit of {limit} {unit}: send it in smaller requests",
        code="request_too_large",
    )


class BodyLimit:
    """Refuse request bodies over `max_bytes` with 413, whether declared up front or streamed."""

    def __init__(self, app: ASGIApp, *, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        refusal = too_large("the request body", self.max_bytes, "bytes")
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await error_response(refusal)(scope, receive, send)
            return
        received = 0

        async def counting_receive() -> Message:
            # A chunked body declares no length: count it as it comes. An ApiError raised here
            # reaches the route that reads the body and is answered like any other.
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise refusal
            return message

        await self.app(scope, counting_receive, send)
