"""The API server: one FastAPI app over the queue (jobs in) and the output storage (results out).

The server is a producer: it validates and enqueues with `producer.schema` and `producer.client`,
and reads outcomes with `producer.layout` and `producer.storage`; it never imports the engine or
the worker. Its OpenAPI document does not depend on its settings, so the committed copy
(docs/openapi.json) is the one every server serves.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import Depends, FastAPI

from producer.client import Client
from producer.http import files, images, jobs
from producer.http.auth import require_token
from producer.http.config import ApiConfig
from producer.http.errors import install_error_handlers
from producer.http.limits import BodyLimit
from producer.http.state import ServerState
from producer.schema import Job
from producer.storage import Storage, open_storage

API_VERSION = "1.0.0"
DESCRIPTION = """Bulk image generation with many LoRA adapters, over HTTP.

Jobs (POST /v1/jobs) are queued for the GPU workers and written to the output storage; a job's
outcome is read back from there. POST /v1/images/generations is OpenAI's images API with
vLLM-Omni's `lora` object. With tokens configured, every /v1 route wants `Authorization: Bearer`.
"""


def _openapi(app: FastAPI) -> dict[str, Any]:
    """FastAPI's document, plus the job schema the jobs route reads by hand."""
    if app.openapi_schema is None:
        from fastapi.openapi.utils import get_openapi

        document = get_openapi(
            title=app.title, version=app.version, description=app.description, routes=app.routes
        )
        document["components"]["schemas"]["Job"] = Job.model_json_schema(
            ref_template="#/components/schemas/{model}"
        )
        app.openapi_schema = document
    return app.openapi_schema


def create_app(config: ApiConfig, *, storage: Storage | None = None, client: Client | None = None) -> FastAPI:
    """The app for `config`; `storage` and `client` default to the configured output and broker."""
    state = ServerState(
        config=config,
        storage=storage or open_storage(config.output_uri),
        client=client or Client(config.broker_url),
    )

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        state.client.close()

    app = FastAPI(
        title="omni-batch",
        version=API_VERSION,
        description=DESCRIPTION,
        lifespan=lifespan,
        redoc_url=None,
    )
    app.state.omni = state
    install_error_handlers(app)
    auth = [Depends(require_token(config.tokens))]
    for router in (jobs.router, images.router, files.router):
        app.include_router(router, dependencies=auth)

    @app.get("/healthz", tags=["health"], summary="Liveness: the server answers")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    app.add_middleware(BodyLimit, max_bytes=config.max_body_bytes)
    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]
    return app
