"""Bearer tokens: with tokens configured, every /v1 route wants `Authorization: Bearer <token>`.

Tokens come from $OMNI_API_TOKENS (read by `producer.settings`). With none configured the server
only listens on loopback (`producer.http.config.check_bind`) and asks for nothing. An OpenAI client
sends its `api_key` this way, so it works unchanged.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable

from fastapi import Depends
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from producer.http.errors import ApiError

# The scheme is declared in the OpenAPI document whether tokens are configured or not, so the
# document does not depend on the server's settings.
bearer = HTTPBearer(auto_error=False, description="one of the tokens in $OMNI_API_TOKENS")


def _known(token: str, tokens: tuple[str, ...]) -> bool:
    # Compare against every token in constant time, so timing says nothing about any of them.
    matches = [hmac.compare_digest(token.encode(), known.encode()) for known in tokens]
    return any(matches)


def require_token(tokens: tuple[str, ...]) -> Callable[..., None]:
    """A route dependency that lets a request through only with one of `tokens` (any if none)."""

    def check(credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:  # noqa: B008
        if not tokens:
            return
        if credentials is None or not _known(credentials.credentials, tokens):
            reason = "no bearer token" if credentials is None else "unknown bearer token"
            raise ApiError(
                401,
                f"{reason}: send `Authorization: Bearer <token>` with one of the server's tokens",
                type="authentication_error",
                code="invalid_api_key",
                headers={"WWW-Authenticate": "Bearer"},
            )

    return check
