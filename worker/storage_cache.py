"""One open storage per output URI for a worker's life (opening an S3 client is not free), and
only for outputs the worker may write to (`worker.output_roots`)."""

from __future__ import annotations

from producer.errors import InvalidStorageURIError
from producer.schema import Job
from producer.settings import ENV_OUTPUT_URI
from producer.storage import Storage, open_storage
from worker.output_roots import OutputRoots


class StorageCache:
    """Maps a job to the storage of its output, or of the worker's default output."""

    def __init__(self, default_uri: str | None, endpoint_url: str | None, *, roots: OutputRoots) -> None:
        self._default = default_uri
        self._endpoint = endpoint_url
        self._roots = roots
        self._open: dict[str, Storage] = {}

    def for_job(self, job: Job) -> Storage:
        """The job's own output, else the default; InvalidStorageURIError when it has neither,
        OutputNotAllowedError when its output lies outside the roots (no roots: anywhere)."""
        uri = job.output or self._default
        if uri is None:
            raise InvalidStorageURIError(
                f"job {job.job_id} has no output and the worker no default output (--out or {ENV_OUTPUT_URI})"
            )
        if self._roots.roots:
            self._roots.check(uri)
        return self.for_uri(uri)

    def for_uri(self, uri: str) -> Storage:
        if uri not in self._open:
            self._open[uri] = open_storage(uri, endpoint_url=self._endpoint)
        return self._open[uri]
