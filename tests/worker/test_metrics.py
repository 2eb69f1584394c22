"""A fleet you can watch: a real `omni-batch worker` process (real redis-server, S3 over HTTP, the
tiny model, real adapters) is scraped over HTTP after it ran jobs, and its metrics and log lines
are checked against what its outputs say happened. Nothing is mocked."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import time
import urllib.request
from collections import Counter, defaultdict

import pytest
from fixtures.brokers import RedisBroker
from fixtures.command_process import OMNI_BATCH
from fixtures.redis_server import free_port
from fixtures.worker_process import (
    ADAPTERS,
    DONE_TIMEOUT_S,
    POLL_S,
    READY_TIMEOUT_S,
    assert_alive,
    wait_drained,
    wait_settled,
)
from fixtures.worker_process import worker_flags as base_flags
from prometheus_client.parser import text_string_to_metric_families

from producer import layout
from producer.client import Client
from producer.errors import SettingsError
from producer.schema import validate_job
from producer.storage import open_storage
from worker import metrics
from worker.settings import WorkerSettings

DATASET = "watched"
USED = ADAPTERS[:3]


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of the worker's /metrics page, keyed by name and sorted labels."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def by_label(samples: dict, name: str, label: str) -> dict[str, float]:
    return {dict(labels)[label]: value for (n, labels), value in samples.items() if n == name}


def call_of(sidecar: dict) -> tuple:
    """The engine call a job ran in: the jobs of one call share its timings to the last digit."""
    return (sidecar["adapter_sha256"], sidecar["timings"]["adapter_s"], sidecar["timings"]["generate_s"])


def scrape_until(port: int, worker, ready) -> dict:
    """Scrape until `ready(samples)`: a job is counted on the consumer's thread just after its upload."""
    deadline = time.monotonic() + DONE_TIMEOUT_S
    while not ready(samples := scrape(port)):
        assert_alive(worker)
        assert time.monotonic() < deadline, f"the metrics never settled:\n{samples}"
        time.sleep(POLL_S)  # polling a condition with a deadline
    return samples


def test_a_scraped_worker_reports_what_happened(
    redis_url, redis_server, s3_bucket, six_adapters, start_worker
):
    good = [
        validate_job({"prompt": f"watch {i}", "adapter": name, "dataset": DATASET})
        for i in range(4)
        for name in USED
    ] + [validate_job({"prompt": f"base {i}", "dataset": DATASET}) for i in range(2)]
    unknown = validate_job({"prompt": "who?", "adapter": "no-such-style", "dataset": DATASET})
    port = free_port()
    with Client(redis_url) as client:
        client.submit_many([*good, unknown])
    flags = base_flags(redis_url, six_adapters, s3_bucket.uri)
    worker = start_worker(*flags, "--metrics-port", str(port), "--summary-interval", "1")
    storage = open_storage(s3_bucket.uri)
    wait_settled(storage, DATASET, [j.job_id for j in [*good, unknown]], worker=worker)
    wait_drained(RedisBroker(redis_server), worker=worker)

    def settled(s: dict) -> bool:
        return (
            s.get(("omni_jobs_done_total", ()), 0)
            + sum(by_label(s, "omni_jobs_failed_total", "error_type").values())
            >= len(good) + 1
        )

    samples = scrape_until(port, worker, settled)

    # What the outputs say happened.
    sidecars = [json.loads(storage.get_bytes(layout.sidecar_key(DATASET, j.job_id))) for j in good]
    calls = {call_of(s): s for s in sidecars}
    jobs_per_call = Counter(call_of(s) for s in sidecars)
    error = json.loads(storage.get_bytes(layout.error_key(DATASET, unknown.job_id)))

    assert samples[("omni_jobs_done_total", ())] == len(good)
    assert by_label(samples, "omni_jobs_failed_total", "error_type") == {error["error_type"]: 1}
    sources = Counter(s["adapter_source"] for s in calls.values() if s["adapter_source"] is not None)
    activations = by_label(samples, "omni_adapter_activations_total", "source")
    assert activations == {source: sources.get(source, 0) for source in ("disk", "host", "resident")}
    assert sum(activations.values()) == sum(1 for s in calls.values() if s["adapter_sha256"] is not None)
    assert samples[("omni_group_jobs_count", ())] == len(calls)
    assert samples[("omni_group_jobs_sum", ())] == len(good)
    assert samples[("omni_generate_seconds_sum", ())] == pytest.approx(
        sum(s["timings"]["generate_s"] for s in calls.values())
    )
    assert samples[("omni_adapter_stall_seconds_total", ())] == pytest.approx(
        sum(s["timings"]["stall_s"] for s in calls.values() if s["adapter_sha256"] is not None)
    )
    assert samples[("omni_queue_wait_seconds_count", ())] == len(good)
    assert samples[("omni_window_jobs", ())] == 0
    assert samples[("omni_window_capacity_jobs", ())] == 64
    assert samples[("omni_fleet_coordinator", ())] == 1, "the only worker on a Redis broker plans"
    info = [dict(labels) for (name, labels), _ in samples.items() if name == "omni_worker_info"]
    assert info and info[0]["model"] == "tiny-sd3"
    assert {name for name, _ in samples if name.startswith("omni_")} <= metrics.exported_names()

    # The log: one line per engine call naming its adapter, jobs and source; a summary line.
    group_lines = re.findall(r"group adapter=(\S+) jobs=(\d+) source=(\S+) seconds=", worker.log)
    assert len(group_lines) == len(calls)
    logged = defaultdict(int)
    for adapter, jobs, _ in group_lines:
        logged[adapter] += int(jobs)
    assert dict(logged) == {**{name: 4 for name in USED}, "-": 2}
    assert Counter(source for _, _, source in group_lines if source != "-") == sources
    assert sorted(jobs_per_call.values()) == sorted(int(jobs) for _, jobs, _ in group_lines)
    deadline = time.monotonic() + DONE_TIMEOUT_S
    while f"done_total={len(good)} failed_total=1" not in worker.log:
        assert time.monotonic() < deadline, f"no summary line:\n{worker.log[-4000:]}"
        time.sleep(POLL_S)  # polling a condition with a deadline

    # The same jobs sent again are skipped, not generated: counted as such, nothing else moves.
    with Client(redis_url) as client:
        client.submit_many(good)
    samples = scrape_until(port, worker, lambda s: s[("omni_jobs_skipped_total", ())] >= len(good))
    assert samples[("omni_jobs_skipped_total", ())] == len(good)
    assert samples[("omni_jobs_done_total", ())] == len(good)
    assert samples[("omni_group_jobs_count", ())] == len(calls)


def test_a_taken_metrics_port_stops_the_worker_with_a_clear_error(redis_url, tmp_path):
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        port = taken.getsockname()[1]
        run = subprocess.run(
            [
                str(OMNI_BATCH),
                "worker",
                "--broker",
                redis_url,
                "--out",
                str(tmp_path),
                *("--metrics-port", str(port)),
            ],
            capture_output=True,
            text=True,
            timeout=READY_TIMEOUT_S,
        )
    assert run.returncode == 2, run.stderr
    assert f"cannot serve metrics on port {port} ($OMNI_METRICS_PORT, --metrics-port)" in run.stderr


def test_a_metrics_port_out_of_range_is_refused_naming_the_variable(monkeypatch):
    monkeypatch.setenv("OMNI_METRICS_PORT", "70000")
    with pytest.raises(SettingsError, match=r"OMNI_METRICS_PORT.*70000"):
        WorkerSettings.from_env()
