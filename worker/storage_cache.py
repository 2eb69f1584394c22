"""One open storage per output URI for a worker's life (opening an S3 client is not free)."""

from __future__ import annotations

from producer.errors import InvalidStorageURIError
from producer.schema import Job
from producer.settings import ENV_OUTPUT_URI
from producer.storage import Storage, open_storage


class StorageCache:
    """Maps a job to the storage of its output, or of the worker's default output."""

    def __init__(self, default_uri: str | None, endpoint_url: str | None) -> None:
        self._default = default_uri
        self._endpoint = endpoint_url
        self._open: dict[str, Storage] = {}

    def for_job(self, job: Job) -> Storage:
        """The job's own output, else the default; InvalidStorageURIError when it has neither."""
        uri = job.output or self._default
        if uri is None:
            raise InvalidStorageURIError(
                f"job {job.job_id} has no output and the worker no default output (--out or {ENV_OUTPUT_URI})"
            )
        return self.for_uri(uri)

    def for_uri(self, uri: str) -> Storage:
        if uri not in self._open:
            self._open[uri] = open_storage(uri, endpoint_url=self._endpoint)
        return self._open[uri]
