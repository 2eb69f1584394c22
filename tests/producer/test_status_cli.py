"""`omni-batch status` and `wait`, run through the real CLI against outputs really written to a
directory and to S3 (moto over HTTP)."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest
from fixtures.s3_server import FAKE_ACCESS_KEY_ID, FAKE_SECRET_ACCESS_KEY, S3Server

from producer.cli import main
from producer.layout import error_key, image_key, sidecar_key
from producer.schema import Job
from producer.storage import LocalStorage, Storage, open_storage

# ---------------------------------------------------------------- helpers


def _jobs_file(tmp_path: Path, jobs: list[dict]) -> Path:
    path = tmp_path / "jobs.jsonl"
    path.write_text("".join(json.dumps(job) + "\n" for job in jobs))
    return path


def _job_ids(tmp_path: Path, *job_ids: str, dataset: str = "ds") -> Path:
    return _jobs_file(tmp_path, [{"job_id": j, "dataset": dataset, "prompt": f"p {j}"} for j in job_ids])


def _done(storage: Storage, job_id: str, dataset: str = "ds") -> None:
    storage.put_bytes(image_key(dataset, job_id), b"\x89PNG", content_type="image/png")
    storage.put_bytes(sidecar_key(dataset, job_id), json.dumps({"job_id": job_id, "status": "ok"}).encode())


def _failed(
    storage: Storage, job_id: str, dataset: str = "ds", reason: str = "adapter 'x': no such dir"
) -> None:
    record = {"job_id": job_id, "status": "failed", "error_type": "AdapterNotFoundError", "error": reason}
    storage.put_bytes(error_key(dataset, job_id), json.dumps(record).encode())


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


# ---------------------------------------------------------------- status


def test_status_counts_done_failed_and_pending(
    output_uri: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    storage = open_storage(output_uri)
    _done(storage, "j1")
    _done(storage, "j2")
    _failed(storage, "j3")
    _failed(storage, "j4")
    _done(storage, "j4")  # failed once, then done when resubmitted
    storage.put_bytes(image_key("ds", "j5"), b"\x89PNG")  # image without sidecar: still running
    _done(storage, "stray")  # not in the job file
    _done(storage, "j6", dataset="other")  # another dataset
    _failed(storage, "j6", dataset="other")
    jobs = _job_ids(tmp_path, "j1", "j2", "j3", "j4", "j5", "j6")

    code, out, _ = _run(
        capsys, "status", "--dataset", "ds", "--out", output_uri, "--jobs", str(jobs), "--json"
    )
    assert code == 0
    assert json.loads(out) == {
        "dataset": "ds",
        "output": storage.uri,
        "expected": 6,
        "done": 3,
        "failed": 1,
        "pending": 2,
        "failed_job_ids": ["j3"],
    }

    code, out, _ = _run(capsys, "status", "--dataset", "ds", "--out", output_uri, "--json")
    assert code == 0
    assert json.loads(out) | {"output": None} == {
        "dataset": "ds",
        "output": None,
        "expected": None,
        "done": 4,
        "failed": 1,
        "pending": None,
        "failed_job_ids": ["j3"],
    }


def test_status_summary_names_the_failures(
    output_uri: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    storage = open_storage(output_uri)
    _done(storage, "j1")
    _failed(storage, "j2", reason="adapter 'styles/ink': no such directory")
    jobs = _job_ids(tmp_path, "j1", "j2", "j3")

    code, out, _ = _run(capsys, "status", "--dataset", "ds", "--out", output_uri, "--jobs", str(jobs))
    assert code == 0
    assert f"dataset 'ds' in {storage.uri}: 1 done, 1 failed, 1 pending, of 3 jobs" in out
    assert "failed j2: AdapterNotFoundError: adapter 'styles/ink': no such directory" in out

    code, out, _ = _run(capsys, "status", "--dataset", "ds", "--out", output_uri)
    assert code == 0
    assert "1 done, 1 failed, pending unknown" in out


def test_status_lists_only_the_first_failures(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    storage = LocalStorage(tmp_path / "out")
    for i in range(7):
        _failed(storage, f"j{i}")
    storage.put_bytes(error_key("ds", "broken"), b"not json")

    code, out, _ = _run(capsys, "status", "--dataset", "ds", "--out", storage.uri)
    assert code == 0
    assert "0 done, 8 failed" in out
    assert "failed broken: (unreadable error record)" in out
    assert out.count("failed j") == 4
    assert "... and 3 more (--json lists them all)" in out


def test_status_reads_the_job_file_as_submit_does(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # No job_id and no dataset: the id is derived with --dataset filled in, as `submit --dataset` does.
    lines = [{"prompt": "a cat"}, {"prompt": "a dog", "dataset": "other"}, {"prompt": "a cow", "scale": 0.5}]
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_bytes(b"\xef\xbb\xbf" + b"\r\n\n".join(json.dumps(line).encode() for line in lines))
    cat, cow = (Job.model_validate({**line, "dataset": "ds"}).job_id for line in (lines[0], lines[2]))
    storage = LocalStorage(tmp_path / "out")
    _done(storage, cat)
    _done(storage, Job.model_validate(lines[1]).job_id, dataset="other")

    code, out, _ = _run(
        capsys, "status", "--dataset", "ds", "--out", storage.uri, "--jobs", str(jobs), "--json"
    )
    assert code == 0
    assert json.loads(out)["done"] == 1
    assert json.loads(out)["pending"] == 1
    assert cow != cat


def test_status_and_wait_take_the_default_flags_of_submit(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Every field shapes a derived id: `submit --scale 2` sent other ids than a plain submit would.
    jobs = _jobs_file(tmp_path, [{"prompt": "a cat"}, {"prompt": "a dog", "scale": 1.0}])
    scaled = Job.model_validate({"prompt": "a cat", "dataset": "ds", "scale": 2.0}).job_id
    storage = LocalStorage(tmp_path / "out")
    _done(storage, scaled)
    argv = ["--dataset", "ds", "--out", storage.uri, "--jobs", str(jobs)]

    code, out, _ = _run(capsys, "status", *argv, "--scale", "2", "--json")
    assert code == 0
    assert (json.loads(out)["done"], json.loads(out)["pending"]) == (1, 1)
    code, out, _ = _run(capsys, "status", *argv, "--json")
    assert (json.loads(out)["done"], json.loads(out)["pending"]) == (0, 2)
    code, _, err = _run(capsys, "wait", *argv, "--scale", "9")
    assert code == 2
    assert "bad default flag: scale" in err


def test_status_takes_the_output_from_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    storage = LocalStorage(tmp_path / "out")
    _done(storage, "j1")
    monkeypatch.setenv("OMNI_OUTPUT_URI", storage.uri)
    code, out, _ = _run(capsys, "status", "--dataset", "ds")
    assert code == 0
    assert ": 1 done," in out

    # The flag wins over the environment.
    code, out, _ = _run(capsys, "status", "--dataset", "ds", "--out", str(tmp_path / "empty"))
    assert code == 0
    assert ": 0 done," in out


def test_status_without_an_output_names_the_flag_and_the_variable(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("OMNI_OUTPUT_URI", raising=False)
    code, _, err = _run(capsys, "status", "--dataset", "ds")
    assert code == 2
    assert "--out" in err
    assert "OMNI_OUTPUT_URI" in err


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"job_id": "j1", "prompt": "p"}\n{"prompt": "p", "colour": "red"}\n', "line 2"),
        ('{"job_id": "j1", "prompt": "p"}\n{not json\n', "line 2"),
        ('{"prompt": "p", "dataset": "other"}\n', "holds no job for dataset 'ds'"),
    ],
)
def test_a_bad_job_file_is_bad_usage(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: str, message: str
) -> None:
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text(content)
    for command in ("status", "wait"):
        code, _, err = _run(capsys, command, "--dataset", "ds", "--out", str(tmp_path), "--jobs", str(jobs))
        assert code == 2
        assert message in err


def test_a_missing_job_file_is_bad_usage(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = _run(capsys, "status", "--dataset", "ds", "--out", str(tmp_path), "--jobs", "nope.jsonl")
    assert code == 2
    assert "nope.jsonl" in err


@pytest.mark.parametrize("dataset", ["..", "a/b", ""])
def test_a_dataset_that_is_not_a_name_is_bad_usage(
    tmp_path: Path, dataset: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = _run(capsys, "status", "--dataset", dataset, "--out", str(tmp_path))
    assert code == 2
    assert "bad default flag: dataset" in err


def test_status_on_a_missing_bucket_fails_without_leaking_secrets(
    s3_server: S3Server, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = _run(capsys, "status", "--dataset", "ds", "--out", "s3://omni-test-no-such-bucket/out")
    assert code == 1
    assert "s3://omni-test-no-such-bucket/out" in err
    assert "NoSuchBucket" in err
    for secret in (FAKE_ACCESS_KEY_ID, FAKE_SECRET_ACCESS_KEY):
        assert secret not in out + err


def test_credentials_in_the_output_uri_are_bad_usage_and_not_repeated(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code, out, err = _run(
        capsys, "status", "--dataset", "ds", "--out", "s3://AKIAEXAMPLE:omni-cli-secret@bkt/p"
    )
    assert code == 2
    assert "credentials" in err
    assert "omni-cli-secret" not in out + err


# ---------------------------------------------------------------- wait


def test_wait_exits_0_when_every_job_is_done(
    output_uri: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    storage = open_storage(output_uri)
    for job_id in ("j1", "j2", "j3"):
        _done(storage, job_id)
    jobs = _job_ids(tmp_path, "j1", "j2", "j3")

    code, out, err = _run(capsys, "wait", "--dataset", "ds", "--out", output_uri, "--jobs", str(jobs))
    assert code == 0
    assert "3 done, 0 failed, 0 pending, of 3 jobs" in out
    assert err == ""  # no progress bar in a log file

    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    code, _, err = _run(capsys, "wait", "--dataset", "ds", "--out", output_uri, "--jobs", str(jobs))
    assert code == 0
    assert "ds: 100%" in err
    assert "3/3" in err


def test_wait_exits_1_when_a_job_failed(
    output_uri: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    storage = open_storage(output_uri)
    _done(storage, "j1")
    _failed(storage, "j2")
    jobs = _job_ids(tmp_path, "j1", "j2")

    code, out, _ = _run(capsys, "wait", "--dataset", "ds", "--out", output_uri, "--jobs", str(jobs))
    assert code == 1
    assert "1 done, 1 failed, 0 pending" in out
    assert "failed j2: AdapterNotFoundError" in out


def test_wait_exits_1_after_the_timeout(
    output_uri: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    storage = open_storage(output_uri)
    _done(storage, "j1")
    jobs = _job_ids(tmp_path, "j1", "j2")

    started = time.monotonic()
    code, out, err = _run(
        capsys,
        "wait",
        *("--dataset", "ds", "--out", output_uri, "--jobs", str(jobs)),
        *("--timeout", "0.3", "--interval", "0.1"),
    )
    elapsed = time.monotonic() - started
    assert code == 1
    assert 0.3 <= elapsed < 10
    assert "timed out after 0.3 s with 1 jobs pending" in err
    assert "1 done, 0 failed, 1 pending" in out


@pytest.mark.parametrize(
    "argv",
    [
        ["--interval", "0"],
        ["--interval", "-1"],
        ["--timeout", "-1"],
        ["--timeout", "soon"],
        ["--timeout", "nan"],
    ],
)
def test_wait_refuses_bad_durations(tmp_path: Path, argv: list[str]) -> None:
    jobs = _job_ids(tmp_path, "j1")
    with pytest.raises(SystemExit) as info:
        main(["wait", "--dataset", "ds", "--out", str(tmp_path), "--jobs", str(jobs), *argv])
    assert info.value.code == 2


def test_wait_needs_the_job_file(tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as info:
        main(["wait", "--dataset", "ds", "--out", str(tmp_path)])
    assert info.value.code == 2
