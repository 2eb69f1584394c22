"""The embedded runner and the demo: real tiny model, real adapters, real storage (local and S3)."""

from __future__ import annotations

import json
import subprocess
from io import BytesIO

import pytest
from fixtures.command_process import OMNI_BATCH
from PIL import Image

from omni_engine import Omni
from omni_engine.lora.request import LoRARequest
from producer import layout
from producer.schema import validate_job
from producer.storage import open_storage
from worker.demo import DEMO_ADAPTERS, DEMO_DATASET, demo_jobs, run_demo
from worker.embedded import run_jobs
from worker.settings import WorkerSettings


def test_demo_writes_every_image_with_minimum_loads_and_reruns_as_a_no_op(tmp_path):
    summary, fifo = run_demo(tmp_path)
    jobs = demo_jobs()
    assert (summary.images, summary.failed) == (len(jobs), 0)
    assert summary.adapter_loads == summary.min_loads == len(DEMO_ADAPTERS)
    assert fifo > 3 * summary.adapter_loads, (
        "the demo's job order should defeat an LRU cache without grouping"
    )
    storage = open_storage(str(tmp_path / "images"))
    for job in jobs:
        record = json.loads(storage.get_bytes(layout.sidecar_key(DEMO_DATASET, job.job_id)))
        assert record["status"] == "ok" and record["job"] == job.wire_dict()
        assert storage.get_bytes(layout.image_key(DEMO_DATASET, job.job_id)).startswith(b"\x89PNG")
        assert (record["adapter_sha256"] is None) == (job.adapter is None)

    again, _ = run_demo(tmp_path)
    assert (again.images, again.skipped, again.adapter_loads) == (0, len(jobs), 0)


@pytest.mark.parametrize("output_uri", ["local", "s3"], indirect=True)
def test_run_stores_the_engines_exact_bytes_and_records_a_bad_job(tmp_path, make_adapter, output_uri):
    root = tmp_path / "adapters"
    make_adapter("a")
    make_adapter("b")
    jobs = [
        validate_job({"prompt": f"p{i}", "adapter": name, "dataset": "ds"})
        for i, name in enumerate(["a", "b", None, "a", "b"])
    ]
    bad = validate_job({"prompt": "missing adapter", "adapter": "nope", "dataset": "ds"})
    settings = WorkerSettings(adapter_roots=(str(root),), max_loras=1, max_cpu_loras=1, output_uri=output_uri)
    engine = Omni("tiny-sd3", max_loras=1, max_cpu_loras=1, adapter_roots=[str(root)])

    summary = run_jobs([*jobs[:2], bad, *jobs[2:]], engine=engine, settings=settings)

    assert (summary.images, summary.failed) == (5, 1)
    assert summary.adapter_loads == 2, "grouping: one load per adapter even with a one-adapter cache"
    storage = open_storage(output_uri)
    error = json.loads(storage.get_bytes(layout.error_key("ds", bad.job_id)))
    assert error["status"] == "failed" and error["error_type"] == "AdapterNotFoundError"
    assert "nope" in error["error"]
    assert not storage.exists(layout.sidecar_key("ds", bad.job_id))

    direct = Omni("tiny-sd3", adapter_roots=[str(root)])
    for job in jobs:
        request = LoRARequest(job.adapter, 1, str(root / job.adapter)) if job.adapter else None
        image = direct.generate(job.prompt, lora_request=request, seed=job.seed)[0].images[0]
        stored = storage.get_bytes(layout.image_key("ds", job.job_id))
        ours = Image.open(BytesIO(stored))
        diff = max(abs(x - y) for x, y in zip(ours.tobytes(), image.tobytes(), strict=True))
        assert diff <= 1, job


def test_mixing_fills_calls_with_cold_adapters_whole_and_never_adds_a_load(tmp_path, make_adapter):
    """With mixing on (a GPU worker's default; set here, since a CPU worker runs one adapter a
    call), seven jobs over four cold adapters run in two calls instead of four, with one load each."""
    root = tmp_path / "adapters"
    for name in "abcd":
        make_adapter(name, rank=2)
    adapters = ["a", "a", "a", "c", "c", "b", "d"]
    jobs = [validate_job({"prompt": f"p{i}", "adapter": a, "dataset": "mix"}) for i, a in enumerate(adapters)]
    out = str(tmp_path / "out")
    settings = WorkerSettings(adapter_roots=(str(root),), max_loras=2, mix_adapters=2, output_uri=out)
    engine = Omni("tiny-sd3", max_loras=2, adapter_roots=[str(root)])

    summary = run_jobs(jobs, engine=engine, settings=settings)

    assert (summary.images, summary.failed) == (7, 0)
    assert summary.adapter_loads == summary.min_loads == 4
    storage = open_storage(out)
    records = [json.loads(storage.get_bytes(layout.sidecar_key("mix", job.job_id))) for job in jobs]
    assert all(record["mixed"] for record in records)
    calls = {(r["timings"]["adapter_s"], r["timings"]["generate_s"]) for r in records}
    assert len(calls) == 2, "a's three jobs with c's two, then b's with d's"

    direct = Omni("tiny-sd3", max_loras=2, adapter_roots=[str(root)])
    for job in jobs:
        request = LoRARequest(job.adapter, 1, str(root / job.adapter))
        alone = direct.generate(job.prompt, lora_request=request, seed=job.seed)[0].images[0]
        ours = Image.open(BytesIO(storage.get_bytes(layout.image_key("mix", job.job_id))))
        diff = max(abs(x - y) for x, y in zip(ours.tobytes(), alone.tobytes(), strict=True))
        # Within rounding: a merged call's other rows round along two paths (test_mixed_calls.py).
        assert diff <= 4, (job.adapter, diff)


def test_run_cli_refuses_a_bad_file_and_runs_nothing(tmp_path):
    jobs_file = tmp_path / "jobs.jsonl"
    jobs_file.write_text('{"prompt": "ok"}\n{"prompt": "bad", "width": 30}\n')
    out = tmp_path / "out"
    result = subprocess.run(
        [str(OMNI_BATCH), "run", str(jobs_file), "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2
    assert "line 2" in result.stderr and "width" in result.stderr and "nothing was run" in result.stderr
    assert not out.exists()


def test_run_cli_runs_a_file_end_to_end(tmp_path):
    jobs_file = tmp_path / "jobs.jsonl"
    jobs_file.write_text('{"prompt": "a"}\n{"prompt": "b"}\n{"prompt": "a"}\n')
    out = tmp_path / "out"
    result = subprocess.run(
        [str(OMNI_BATCH), "run", str(jobs_file), "--out", str(out), "--dataset", "cli"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "images      2" in result.stdout and "skipped 1 duplicate" in result.stdout
    assert len(list((out / "cli").glob("*.png"))) == 2


def test_run_cli_loads_each_adapter_once_from_a_file_that_cycles_through_them(tmp_path, make_adapter):
    """`run` takes a file in the order `submit` queues it (each adapter's jobs together), so even a
    window of two jobs and a one-adapter cache load each adapter once."""
    for name in "abc":
        make_adapter(name, rank=2)
    jobs_file = tmp_path / "jobs.jsonl"
    lines = (f'{{"prompt": "p{i}", "adapter": "{a}"}}\n' for i, a in enumerate("abc" * 3))
    jobs_file.write_text("".join(lines))
    command = [str(OMNI_BATCH), "run", str(jobs_file), "--out", str(tmp_path / "out")]
    command += ["--adapter-root", str(tmp_path / "adapters"), "--window", "2", "--max-loras", "1"]
    result = subprocess.run([*command, "--max-cpu-loras", "1"], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert "images      9" in result.stdout
    assert "adapter loads from disk 3 (minimum possible 3)" in result.stdout


def test_run_cli_with_a_compiled_denoiser_writes_every_image(tmp_path, make_adapter):
    """--compile reaches the engine: a mixed-adapter file runs through the compiled denoiser.

    The "eager" backend: dynamo's capture without inductor's code generation (minutes on this CPU).
    """
    make_adapter("a", rank=4)
    make_adapter("b", rank=8)
    jobs_file = tmp_path / "jobs.jsonl"
    jobs_file.write_text("".join(f'{{"prompt": "p{i}", "adapter": "{a}"}}\n' for i, a in enumerate("abab")))
    out = tmp_path / "out"
    command = [str(OMNI_BATCH), "run", str(jobs_file), "--out", str(out), "--dataset", "compiled"]
    command += ["--adapter-root", str(tmp_path / "adapters"), "--compile", "eager", "--max-loras", "1"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr
    records = [json.loads(path.read_text()) for path in (out / "compiled").glob("*.json")]
    assert sorted(r["job"]["adapter"] for r in records) == ["a", "a", "b", "b"]
    assert all(r["status"] == "ok" for r in records) and len(list((out / "compiled").glob("*.png"))) == 4

    refused = subprocess.run([*command, "--compile", "fastest"], capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2 and "--compile" in refused.stderr and "'fastest'" in refused.stderr


def test_the_same_job_given_twice_runs_once(tmp_path):
    job = validate_job({"prompt": "twice", "dataset": "ds"})
    settings = WorkerSettings(output_uri=str(tmp_path / "out"))
    summary = run_jobs([job, job], engine=Omni("tiny-sd3"), settings=settings)
    assert (summary.jobs, summary.images, summary.skipped) == (2, 1, 1)
