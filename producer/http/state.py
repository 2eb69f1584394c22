"""What every route shares: the settings, the output storage and the broker client, one of each."""

from __future__ import annotations

from dataclasses import dataclass

from fastapi import Request

from producer.client import Client
from producer.http.config import ApiConfig
from producer.storage import Storage


@dataclass(frozen=True)
class ServerState:
    config: ApiConfig
    storage: Storage
    client: Client


def server(request: Request) -> ServerState:
    """The state of the app serving `request` (set by `create_app`)."""
    return request.app.state.omni
