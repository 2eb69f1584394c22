"""Shared fixtures live in tests/fixtures/, one module per real service or artefact."""

pytest_plugins = [
    "fixtures.redis_server",
    "fixtures.brokers",
    "fixtures.s3_server",
    "fixtures.tcp_proxy",
    "fixtures.engine",
    "fixtures.worker_process",
    "fixtures.api_server",
    "fixtures.beat_process",
    "fixtures.cpu_hogs",
]
