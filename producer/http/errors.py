"""Every error the API answers, in one shape: OpenAI's `{"error": {...}}`, plus the list of problems.

OpenAI's shape, so an OpenAI client library raises its own typed errors with our message; the
`problems` list carries every violation of a refused batch, each naming its place and field.
Messages pass through `producer.redact`: no credential is ever echoed back.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException

from producer.errors import BrokerUnavailableError, StorageError, StorageUnavailableError
from producer.redact import redact


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None
    problems: list[str] = []


class ErrorResponse(BaseModel):
    error: ErrorDetail


class ApiError(HTTPException):
    """An answer other than success: the HTTP status, a readable message, and what it is about.

    An HTTPException, so FastAPI lets it through even when raised while the body is being read.
    """

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        problems: list[str] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(status, redact(message), headers)
        self.status = status
        self.detail = ErrorDetail(
            message=redact(message),
            type=type,
            param=param,
            code=code,
            problems=[redact(problem) for problem in problems or ()],
        )


def error_response(error: ApiError) -> JSONResponse:
    return JSONResponse(
        ErrorResponse(error=error.detail).model_dump(mode="json"),
        status_code=error.status,
        headers=error.headers,
    )


def _field(loc: tuple[Any, ...]) -> str:
    # ("body", "n") -> "n"; ("path", "dataset") -> "dataset"
    parts = [str(part) for part in loc[1:]] or [str(part) for part in loc]
    return ".".join(parts)


def install_error_handlers(app: FastAPI) -> None:
    """Answer ApiError, request validation and routing errors in the one error shape."""

    async def api_error(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, ApiError)
        return error_response(exc)

    async def validation_error(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        problems = [f"{_field(tuple(err['loc']))}: {err['msg']}" for err in exc.errors()]
        first = exc.errors()[0] if exc.errors() else {"loc": ()}
        return error_response(
            ApiError(
                422,
                "; ".join(problems) or "invalid request",
                param=_field(tuple(first["loc"])) or None,
                code="invalid_value",
                problems=problems,
            )
        )

    async def http_error(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, HTTPException)
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return error_response(ApiError(exc.status_code, str(exc.detail), code=code, headers=exc.headers))

    async def unavailable(_: Request, exc: Exception) -> JSONResponse:
        # Their messages already name the broker or storage without credentials (redacted again).
        if isinstance(exc, BrokerUnavailableError | StorageUnavailableError):
            return error_response(ApiError(503, str(exc), type="server_error", code="unavailable"))
        return error_response(ApiError(502, str(exc), type="server_error", code="storage_error"))

    app.add_exception_handler(ApiError, api_error)
    app.add_exception_handler(BrokerUnavailableError, unavailable)
    app.add_exception_handler(StorageError, unavailable)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(HTTPException, http_error)


def responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """The `responses=` of a route: each error status it may answer, in the error shape."""
    text = {
        400: "The body is not valid JSON",
        401: "No bearer token, or an unknown one",
        404: "No such job output, dataset file or route",
        413: "The body or the job list is larger than the server accepts",
        422: "A parameter or a job breaks the schema (every problem listed)",
        500: "A job failed on the worker for a reason other than the request (its error record says why)",
        502: "The output storage refused the request",
        503: "The broker or the output storage cannot be reached: nothing was lost, try again",
    }
    return {status: {"model": ErrorResponse, "description": text[status]} for status in statuses}
