"""A worker that cannot go on exits non-zero, saying why, so a supervisor restarts it (or a person
looks): real `omni-batch worker` processes against real brokers."""

from __future__ import annotations

import os
import subprocess

from fixtures.command_process import OMNI_BATCH
from fixtures.worker_process import READY_TIMEOUT_S

from producer.cli import EXIT_FAILURE, EXIT_USAGE
from producer.settings import ENV_OUTPUT_ROOTS, ENV_OUTPUT_URI


def run_worker(*args: str, env: dict[str, str] | None = None) -> tuple[int, str]:
    """`omni-batch worker ARGS` to its end: (exit code, output)."""
    done = subprocess.run(
        [str(OMNI_BATCH), "worker", *args],
        capture_output=True,
        text=True,
        timeout=READY_TIMEOUT_S,
        env={**os.environ, **(env or {})},
    )
    return done.returncode, done.stdout + done.stderr


def test_a_broker_that_refuses_the_credentials_stops_the_worker_with_exit_1(
    broker, redis_server_factory, tmp_path
):
    if broker.kind == "redis":
        url = redis_server_factory(password="right-password").url.replace("right-", "wrong-")
    else:
        url = broker.url.replace("guest:guest@", "guest:wrong-password@")
    code, output = run_worker("--broker", url, "--out", str(tmp_path / "out"))
    assert code == EXIT_FAILURE, output[-3000:]
    assert "refused the credentials" in output, output[-3000:]
    assert "wrong-password" not in output, "the password is never logged"


def test_a_model_that_does_not_load_stops_the_worker_with_exit_1(redis_url, tmp_path):
    missing = tmp_path / "no-such-pipeline"
    code, output = run_worker("--broker", redis_url, "--out", str(tmp_path / "out"), "--model", str(missing))
    assert code == EXIT_FAILURE, output[-3000:]
    assert "no-such-pipeline" in output


def test_a_worker_with_nowhere_to_write_or_a_bad_root_does_not_start(redis_url, tmp_path):
    env = {ENV_OUTPUT_URI: "", ENV_OUTPUT_ROOTS: ""}
    code, output = run_worker("--broker", redis_url, env=env)
    assert code == EXIT_USAGE and "nowhere to write" in output, output[-3000:]

    env[ENV_OUTPUT_ROOTS] = "s3://Not_A_Bucket/x"
    code, output = run_worker("--broker", redis_url, "--out", str(tmp_path / "out"), env=env)
    assert code == EXIT_USAGE and ENV_OUTPUT_ROOTS in output and "Not_A_Bucket" in output, output[-3000:]


def test_a_negative_broker_heartbeat_is_bad_usage_naming_the_flag_and_variable(tmp_path):
    code, output = run_worker("--broker-heartbeat", "-5", "--out", str(tmp_path / "out"))
    assert code == EXIT_USAGE, output[-3000:]
    assert "--broker-heartbeat" in output and "OMNI_BROKER_HEARTBEAT" in output and "-5" in output


def test_compile_with_no_compiler_to_build_kernels_is_bad_usage_naming_the_variable(redis_url, tmp_path):
    # A worker that started would fail every job it took, at each job's first call.
    env = {"PATH": str(tmp_path), "CC": "no-such-cc", "CXX": "no-such-c++"}  # nothing on PATH either
    flags = ("--broker", redis_url, "--out", str(tmp_path / "out"), "--compile", "inductor")
    code, output = run_worker(*flags, env=env)
    assert code == EXIT_USAGE, output[-3000:]
    assert "OMNI_COMPILE, --compile" in output and "compiler, and none was found" in output, output[-3000:]
