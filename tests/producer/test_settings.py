"""The environment, read in one place: what is set, typed; what is not, None."""

from __future__ import annotations

import os

import pytest

from producer import settings
from producer.defaults import DEFAULT_BROKER_URL
from producer.errors import SettingsError, UsageError
from producer.settings import Environment, read_environment


def test_an_empty_environment_leaves_every_default_to_its_reader() -> None:
    assert read_environment({}) == Environment()
    assert read_environment({}).broker_url == DEFAULT_BROKER_URL
    assert read_environment({settings.ENV_MODEL: ""}).model is None  # empty is unset


def test_every_variable_is_read_and_typed() -> None:
    env = read_environment(
        {
            settings.ENV_BROKER_URL: "redis://h:1/0",
            settings.ENV_OUTPUT_URI: "s3://bucket/out",
            settings.ENV_S3_ENDPOINT_URL: "http://127.0.0.1:9000",
            settings.ENV_ADAPTER_ROOTS: os.pathsep.join(["/a", "", "/b"]),
            settings.ENV_MAX_LORAS: "2",
            settings.ENV_WINDOW: "8",
            settings.ENV_CACHE_DIR: "/cache",
            settings.ENV_COMPILE: "inductor",
            settings.ENV_BROKER_HEARTBEAT: "30",
        }
    )
    assert env.broker_url == "redis://h:1/0"
    assert (env.output_uri, env.s3_endpoint_url) == ("s3://bucket/out", "http://127.0.0.1:9000")
    assert env.adapter_roots == ("/a", "/b")
    assert (env.max_loras, env.window, env.max_batch) == (2, 8, None)
    assert env.cache_dir == "/cache"
    assert env.compile == "inductor"
    assert env.broker_heartbeat_s == 30


def test_a_malformed_number_names_the_variable_and_is_bad_usage() -> None:
    with pytest.raises(SettingsError, match=r"\$OMNI_WINDOW must be an integer, got 'lots'") as info:
        read_environment({settings.ENV_WINDOW: "lots"})
    assert isinstance(info.value, UsageError) and isinstance(info.value, ValueError)


def test_task_events_are_on_unless_switched_off_and_a_bad_switch_is_named() -> None:
    assert read_environment({}).task_events is True
    assert read_environment({settings.ENV_TASK_EVENTS: "Off"}).task_events is False
    with pytest.raises(SettingsError, match=r"\$OMNI_TASK_EVENTS must be one of .*, got 'maybe'"):
        read_environment({settings.ENV_TASK_EVENTS: "maybe"})


def test_the_process_environment_is_read_at_each_call(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(settings.ENV_MODEL, "small-sd3")
    assert read_environment().model == "small-sd3"
    monkeypatch.delenv(settings.ENV_MODEL)
    assert read_environment().model is None
