"""bench/tax.py end to end on the tiny model: its table, and its check that diffusers applies the LoRA."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

TAX = Path(__file__).resolve().parents[2] / "bench" / "tax.py"


def _load_tax():
    spec = importlib.util.spec_from_file_location("bench_tax", TAX)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_tax_prints_each_row_and_the_diffusers_rows_apply_the_lora():
    flags = ["--models", "tiny-sd3", "--jobs", "6", "--adapters", "3", "--reps", "1", "--rounds", "2"]
    flags += ["--modes", "base", "diffusers-loop", "diffusers-grouped", "omni-batch"]
    done = subprocess.run(
        [sys.executable, str(TAX), *flags], capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr
    rows = {
        cells[0]: cells[1:]
        for line in done.stdout.splitlines()
        if line.startswith("| ") and (cells := [c.strip() for c in line.strip("|").split("|")])
    }
    base, loop = rows["base (no adapter)"], rows["plain diffusers loop"]
    grouped = next(cells for label, cells in rows.items() if label.startswith("diffusers, grouped"))
    omni = next(cells for label, cells in rows.items() if label.startswith("omni-batch"))
    # Columns: wall s, vs base, images/s, calls, disk loads, stall.
    assert base[1] == "x1.000" and float(base[2]) > 0 and base[3] == "1"
    assert loop[3:5] == ["6", "6"], "the loop makes a call and a load for every job"
    assert float(grouped[0]) > 0
    assert 1 <= int(omni[4]) <= 3, "omni-batch loads each of at most 3 adapters about once"
    assert 1 <= int(omni[3]) <= int(grouped[3]), "omni-batch makes no more calls than one per adapter"
    host = next(cells for label, cells in rows.items() if label.startswith("r16,"))
    assert float(host[0]) > 0 and float(host[1]) > 0, "host hit ms and memcpy ms"
    assert re.search(r"^check: plain diffusers loop vs base: 6/6 images changed", done.stdout, re.M), (
        done.stdout
    )
    assert re.search(r"^check: diffusers, grouped.* vs base: 6/6 images changed", done.stdout, re.M)
    assert re.search(r"^check: plain diffusers loop vs omni-batch.*<= \d+ required", done.stdout, re.M)
    assert "check: ok" in done.stdout
    # Two rounds, the second backwards; the table gives medians.
    assert "medians of 2 round(s)" in done.stdout
    order = [
        line.split()[3].rstrip(":")
        for line in done.stderr.splitlines()
        if line.startswith("tiny-sd3 round 1 ")
    ]
    assert order == ["diffusers-loop", "diffusers-grouped", "omni-batch", "base"], done.stderr


def test_the_check_fails_when_the_loop_changes_nothing(tmp_path):
    tax = _load_tax()
    jobs = [
        tax.validate_job({"job_id": f"j{i}", "dataset": "tax", "prompt": "p", "adapter": "a"})
        for i in range(2)
    ]
    base_jobs = [tax.validate_job({"job_id": f"j{i}", "dataset": "tax", "prompt": "p"}) for i in range(2)]
    rows = {}
    for mode in ("base", "diffusers-loop"):
        (tmp_path / mode / "tax").mkdir(parents=True)
        for job in jobs:
            Image.fromarray(np.full((8, 8, 3), 7, np.uint8)).save(
                tmp_path / mode / "tax" / f"{job.job_id}.png"
            )
        rows[mode] = tax.Row(mode, mode, 1.0, 2, 2, 2, None, tmp_path / mode)
    work = tax.Workload("tiny-sd3", jobs, base_jobs, tmp_path)

    lines, ok = tax.check_plain(rows, work)

    assert not ok
    assert "0/2 images changed" in lines[0] and lines[-1] == "check: FAILED"
