"""Where a client fetches a job's image and sidecar: a presigned URL on S3, the API itself otherwise.

`GET /v1/files/{dataset}/{filename}` serves only keys of the output layout (`producer.layout`),
read through the storage, which keeps every key inside the output root (symlinks included).
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Request, Response

from producer.http.errors import ApiError, responses
from producer.http.state import server
from producer.layout import IMAGE_CONTENT_TYPE, JSON_CONTENT_TYPE, OutputKind, classify_key
from producer.schema import Name
from producer.storage import S3Storage

router = APIRouter(tags=["files"])

_CONTENT_TYPES = {
    OutputKind.IMAGE: IMAGE_CONTENT_TYPE,
    OutputKind.SIDECAR: JSON_CONTENT_TYPE,
    OutputKind.ERROR: JSON_CONTENT_TYPE,
}


def output_url(request: Request, key: str) -> str:
    """The URL a client reads output `key` at: presigned for S3, this server's /v1/files otherwise."""
    state = server(request)
    if isinstance(state.storage, S3Storage):
        return state.storage.presigned_url(key, expires_s=state.config.url_expires_s)
    dataset, _, filename = key.partition("/")
    return str(request.url_for("read_file", dataset=dataset, filename=filename))


@router.get(
    "/v1/files/{dataset}/{filename}",
    name="read_file",
    summary="Read a job's image, sidecar or error record",
    response_class=Response,
    responses={
        200: {
            "description": "The file",
            "content": {IMAGE_CONTENT_TYPE: {}, JSON_CONTENT_TYPE: {}},
        },
        **responses(401, 404, 422, 502, 503),
    },
)
def read_file(
    request: Request,
    dataset: Annotated[Name, Path(description="the dataset")],
    filename: Annotated[str, Path(max_length=256, description="`<job_id>.png`, `.json` or `.error.json`")],
) -> Response:
    key = f"{dataset}/{filename}"
    ref = classify_key(key)
    if ref is None:
        raise ApiError(404, f"no such output file: {key!r} is not an image, sidecar or error record name")
    data = server(request).storage.get_bytes(key)
    if data is None:
        raise ApiError(404, f"no output file {key!r} (yet)", code="not_found")
    return Response(data, media_type=_CONTENT_TYPES[ref.kind])
