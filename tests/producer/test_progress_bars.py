"""Progress bars where a person waits (`submit`, `wait`, `run`): drawn on a real terminal (a pty as
stderr), and nothing at all when stderr is a pipe, as in a log file or CI."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import select
import struct
import subprocess
import termios
import time
from pathlib import Path

from fixtures.command_process import OMNI_BATCH

from producer.layout import sidecar_key
from producer.schema import validate_job
from producer.storage import LocalStorage

TIMEOUT_S = 300


def on_terminal(*args: str) -> tuple[int, str]:
    """Run `omni-batch ARGS` with a terminal as stderr; its exit code and what the terminal showed."""
    main, terminal = pty.openpty()
    # A terminal has a size (a new pty's is 0 x 0, where a bar has no room to be drawn).
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))
    proc = subprocess.Popen(
        [str(OMNI_BATCH), *args], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=terminal
    )
    os.close(terminal)
    shown, deadline = bytearray(), time.monotonic() + TIMEOUT_S
    while time.monotonic() < deadline:
        if select.select([main], [], [], 1)[0]:
            try:
                data = os.read(main, 65536)
            except OSError:  # EIO: the process closed the terminal
                break
            if not data:
                break
            shown += data
        elif proc.poll() is not None:
            break
    os.close(main)
    return proc.wait(TIMEOUT_S), shown.decode(errors="replace")


def in_a_pipe(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(OMNI_BATCH), *args], capture_output=True, text=True, timeout=TIMEOUT_S)


def write_jobs(path: Path, count: int, dataset: str) -> list[str]:
    lines = [{"prompt": f"bar {i}", "dataset": dataset} for i in range(count)]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return [validate_job(line).job_id for line in lines]


def test_submit_shows_reading_and_sending_on_a_terminal_and_nothing_in_a_pipe(tmp_path, redis_url):
    jobs = tmp_path / "jobs.jsonl"
    write_jobs(jobs, 2500, "bars")
    code, shown = on_terminal("submit", str(jobs), "--broker", redis_url)
    assert code == 0, shown
    assert f"reading {jobs}" in shown  # validating a large file takes a while too
    assert "submitting" in shown and "2500/2500" in shown

    piped = in_a_pipe("submit", str(jobs), "--broker", redis_url)
    assert piped.returncode == 0 and piped.stderr == ""
    assert "submitted 2500 jobs" in piped.stdout


def test_wait_shows_the_dataset_filling_up_on_a_terminal_and_nothing_in_a_pipe(tmp_path):
    jobs = tmp_path / "jobs.jsonl"
    out = tmp_path / "out"
    storage = LocalStorage(out)
    for job_id in write_jobs(jobs, 3, "waited"):
        storage.put_bytes(sidecar_key("waited", job_id), b'{"status": "ok"}')
    args = ("wait", "--dataset", "waited", "--out", str(out), "--jobs", str(jobs))
    code, shown = on_terminal(*args)
    assert code == 0, shown
    assert "waited" in shown and "3/3" in shown
    piped = in_a_pipe(*args)
    assert piped.returncode == 0 and piped.stderr == ""


def test_run_shows_its_jobs_going_through_on_a_terminal(tmp_path):
    jobs = tmp_path / "jobs.jsonl"
    write_jobs(jobs, 2, "ran")
    code, shown = on_terminal(
        "run", str(jobs), "--out", str(tmp_path / "out"), "--width", "32", "--height", "32"
    )
    assert code == 0, shown
    assert "running" in shown and "2/2" in shown
