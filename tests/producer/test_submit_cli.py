"""`omni-batch submit` end to end: a JSONL file in, messages in a real Redis out (or nothing)."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import redis
from fixtures.command_process import OMNI_BATCH
from fixtures.redis_server import RedisServer, free_port, queued_messages

from producer import defaults as d
from producer import settings
from producer.cli import main
from producer.routing import adapter_shard, shard_queue


@pytest.fixture(autouse=True)
def _no_broker_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(settings.ENV_BROKER_URL, raising=False)


def write_jobs(path: Path, *lines: object) -> str:
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return str(path)


def sent_jobs(redis_url: str) -> list[dict]:
    return [m["decoded_body"][0][0] for m in queued_messages(redis.Redis.from_url(redis_url), "omni")]


def redis_keys(redis_url: str) -> list[bytes]:
    return redis.Redis.from_url(redis_url).keys()


def test_submit_enqueues_every_job_and_prints_a_summary(
    tmp_path: Path, redis_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    jobs = write_jobs(
        tmp_path / "jobs.jsonl",
        {"prompt": "a cat", "dataset": "cats"},
        {"prompt": "a dog", "dataset": "dogs", "adapter": "styles/ink", "priority": 9},
        {"prompt": "a cow", "dataset": "cats", "job_id": "cow-1", "seed": 3},
    )
    assert main(["submit", jobs, "--broker", redis_url]) == 0

    sent = sent_jobs(redis_url)
    assert [job["prompt"] for job in sent] == ["a dog", "a cat", "a cow"]  # most urgent first
    assert sent[2]["job_id"] == "cow-1" and sent[2]["seed"] == 3
    assert all(len(job) == 14 for job in sent)  # every field on the wire, derived ones filled
    out = capsys.readouterr().out
    assert f"submitted 3 jobs to queue 'omni' on {redis_url}" in out
    assert "datasets: cats (2), dogs (1)" in out


def test_submit_says_when_a_fleet_following_affinity_takes_the_jobs_on_shard_queues(
    tmp_path: Path, redis_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    client = redis.Redis.from_url(redis_url)
    client.set(d.FLEET_PLAN_KEY, json.dumps({"version": 1, "owners": {}}))  # a coordinator's plan
    jobs = write_jobs(
        tmp_path / "jobs.jsonl",
        {"prompt": "a cat", "adapter": "styles/ink"},
        {"prompt": "a dog", "adapter": "styles/ink"},
        {"prompt": "a cow", "adapter": "styles/oil"},
        {"prompt": "a hen"},
    )
    assert main(["submit", jobs, "--broker", redis_url]) == 0

    routed = {shard_queue(adapter_shard(name)) for name in ("styles/ink", "styles/oil")}
    assert len(queued_messages(client, "omni")) == 1, "a job without an adapter stays on omni"
    assert sum(len(queued_messages(client, queue)) for queue in routed) == 3
    out = capsys.readouterr().out
    where = "2 adapter shard queue(s) (3 job(s), adapter affinity) and queue 'omni' (1 job(s))"
    assert f"submitted 4 jobs to {where} on {redis_url}" in out


def test_flags_are_defaults_for_lines_that_lack_the_field(tmp_path: Path, redis_url: str) -> None:
    jobs = write_jobs(
        tmp_path / "jobs.jsonl",
        {"prompt": "plain"},
        {"prompt": "own values", "dataset": "mine", "adapter": None, "width": 128, "priority": 1},
    )
    flags = ["--dataset", "ds", "--adapter", "a/b", "--scale", "0.5", "--steps", "4", "--guidance-scale", "2"]
    flags += ["--width", "64", "--height", "32", "--priority", "7", "--output", "s3://bucket/out"]
    assert main(["submit", jobs, "--broker", redis_url, *flags]) == 0

    plain, own = sent_jobs(redis_url)
    assert plain["prompt"] == "plain"
    assert (plain["dataset"], plain["adapter"], plain["scale"], plain["steps"]) == ("ds", "a/b", 0.5, 4)
    assert (plain["guidance_scale"], plain["width"], plain["height"]) == (2.0, 64, 32)
    assert (plain["priority"], plain["output"]) == (7, "s3://bucket/out")
    assert (own["dataset"], own["adapter"], own["width"], own["priority"]) == ("mine", None, 128, 1)
    assert own["height"] == 32


def test_a_bad_line_sends_nothing_and_names_line_and_field(
    tmp_path: Path, redis_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    jobs = write_jobs(
        tmp_path / "jobs.jsonl",
        {"prompt": "fine"},
        "",
        {"prompt": "fine too"},
        {"prompt": "bad", "width": 12},
        "{not json",
        {"prompt": "x", "sead": 1},
    )
    assert main(["submit", jobs, "--broker", redis_url]) == 2

    assert redis_keys(redis_url) == []  # not even a queue declaration
    err = capsys.readouterr().err
    assert "3 bad line(s); nothing was sent" in err
    assert "line 4: width = 12:" in err  # blank line 2 still counts
    assert "line 5: not valid JSON" in err
    assert "line 6: sead: unknown field" in err
    assert "line 1:" not in err and "line 3:" not in err


def test_many_bad_lines_are_listed_up_to_a_limit(
    tmp_path: Path, redis_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    jobs = write_jobs(tmp_path / "jobs.jsonl", *[{"prompt": ""}] * 50)
    assert main(["submit", jobs, "--broker", redis_url]) == 2
    err = capsys.readouterr().err
    assert "50 bad line(s)" in err
    assert "line 20: prompt" in err and "line 21: prompt" not in err
    assert "... and 30 more" in err


def test_a_bad_default_flag_is_reported_once(
    tmp_path: Path, redis_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    jobs = write_jobs(tmp_path / "jobs.jsonl", {"prompt": "a"}, {"prompt": "b"})
    assert main(["submit", jobs, "--broker", redis_url, "--adapter", "../escape"]) == 2
    err = capsys.readouterr().err
    assert "bad default flag: adapter = '../escape'" in err
    assert "line" not in err
    assert redis_keys(redis_url) == []


def test_conflicting_job_ids_are_bad_input(
    tmp_path: Path, redis_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    jobs = write_jobs(tmp_path / "jobs.jsonl", {"prompt": "a", "job_id": "j"}, {"prompt": "b", "job_id": "j"})
    assert main(["submit", jobs, "--broker", redis_url]) == 2
    assert "line 2: job_id = 'j': line 1 has a different job" in capsys.readouterr().err
    assert redis_keys(redis_url) == []


def test_identical_lines_are_sent_once(
    tmp_path: Path, redis_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    jobs = write_jobs(tmp_path / "jobs.jsonl", {"prompt": "a"}, {"prompt": "b"}, {"prompt": "a"})
    assert main(["submit", jobs, "--broker", redis_url]) == 0
    assert [job["prompt"] for job in sent_jobs(redis_url)] == ["a", "b"]
    assert "skipped 1 duplicate line(s)" in capsys.readouterr().out


def test_dash_reads_stdin(redis_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    data = b'\xef\xbb\xbf{"prompt": "from stdin"}\r\n{"prompt": "second"}'  # BOM, CRLF, no final newline
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(data)))
    assert main(["submit", "-", "--broker", redis_url]) == 0
    assert [job["prompt"] for job in sent_jobs(redis_url)] == ["from stdin", "second"]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "no jobs"),
        (b"\n  \n", "no jobs"),
        (b'{"prompt": "ok"}\n{"prompt": "\xff"}\n', "line 2: not UTF-8"),
    ],
)
def test_empty_or_undecodable_input_is_bad_input(
    tmp_path: Path, redis_url: str, capsys: pytest.CaptureFixture[str], content: bytes, message: str
) -> None:
    path = tmp_path / "jobs.jsonl"
    path.write_bytes(content)
    assert main(["submit", str(path), "--broker", redis_url]) == 2
    assert message in capsys.readouterr().err
    assert redis_keys(redis_url) == []


def test_missing_file_is_bad_input(
    tmp_path: Path, redis_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["submit", str(tmp_path / "nope.jsonl"), "--broker", redis_url]) == 2
    assert "cannot read" in capsys.readouterr().err


def test_unreachable_broker_exits_1_without_the_password(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    jobs = write_jobs(tmp_path / "jobs.jsonl", {"prompt": "a"})
    port = free_port()
    assert main(["submit", jobs, "--broker", f"redis://:hunter2@127.0.0.1:{port}/0"]) == 1
    captured = capsys.readouterr()
    assert f"broker redis://***@127.0.0.1:{port}/0 is unavailable" in captured.err
    assert "nothing was sent" in captured.err
    assert "hunter2" not in captured.out + captured.err


def test_password_never_printed_on_success(
    tmp_path: Path,
    redis_server_factory: Callable[..., RedisServer],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    server = redis_server_factory(password="s3cret-pw")
    monkeypatch.setenv(settings.ENV_BROKER_URL, server.url)  # no --broker: the environment's
    jobs = write_jobs(tmp_path / "jobs.jsonl", {"prompt": "a"})
    assert main(["submit", jobs]) == 0
    captured = capsys.readouterr()
    assert "s3cret-pw" not in captured.out + captured.err
    assert f"on redis://***@127.0.0.1:{server.port}/0" in captured.out
    assert len(queued_messages(server.client(), "omni")) == 1


def test_console_script_submits(tmp_path: Path, redis_url: str) -> None:
    jobs = write_jobs(tmp_path / "jobs.jsonl", {"prompt": "via the console script"})
    done = subprocess.run(
        [str(OMNI_BATCH), "submit", jobs, "--broker", redis_url], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert [job["prompt"] for job in sent_jobs(redis_url)] == ["via the console script"]


def test_console_script_submit_help() -> None:
    done = subprocess.run([str(OMNI_BATCH), "submit", "--help"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "JOBS.jsonl" in done.stdout and "--guidance-scale" in done.stdout


def test_submit_works_where_torch_cannot_be_imported() -> None:
    # The plain install has no torch: make `import torch` fail, as it would there.
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "from producer.cli import main\n"
        "try:\n    main(['submit', '--help'])\nexcept SystemExit as e:\n    sys.exit(e.code)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "JOBS.jsonl" in done.stdout


def test_producer_modules_and_the_lora_request_do_not_import_torch_or_the_worker() -> None:
    code = (
        "import pkgutil, sys, producer\n"
        "for m in pkgutil.walk_packages(producer.__path__, 'producer.'):\n"
        "    __import__(m.name)\n"
        "import omni_engine.lora.request, omni_engine.lora.source\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
        "assert not [m for m in sys.modules if m.startswith('worker')], 'worker imported'\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
