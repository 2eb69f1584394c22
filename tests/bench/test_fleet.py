"""bench/fleet.py --quick end to end: every table, every policy, figures that agree with each other."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

FLEET = Path(__file__).resolve().parents[2] / "bench" / "fleet.py"
POLICIES = ["FIFO", "window", "affinity"]
TITLES = ["Poisson arrivals", "A whole dataset queued at once", "Workers stopped halfway"]


def number(cell: str) -> float:
    return float(cell.replace(",", ""))


def tables(stdout: str) -> dict[str, list[dict[str, str]]]:
    """Each table's rows, by its title, as {column: cell}."""
    found: dict[str, list[dict[str, str]]] = {}
    title, header = None, None
    for line in stdout.splitlines():
        if line.endswith(":") and not line.startswith("|"):
            title, header = line[:-1], None
        elif line.startswith("|---"):
            continue
        elif line.startswith("| "):
            cells = [cell.strip() for cell in line.strip("|").split("|")]
            if header is None:
                header = cells
            else:
                found.setdefault(title, []).append(dict(zip(header, cells, strict=True)))
    return found


def test_quick_run_prints_every_table_with_consistent_figures() -> None:
    done = subprocess.run(
        [sys.executable, str(FLEET), "--quick"], capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr

    found = tables(done.stdout)
    assert list(found) == TITLES
    for title, rows in found.items():
        assert [row["policy"] for row in rows] == POLICIES * (len(rows) // 3), title
        for row in rows:
            where = f"{title}: {row}"
            bound, cold, jobs = number(row["lower bound"]), number(row["cold loads"]), number(row["jobs"])
            assert 0 < bound <= number(row["adapters"]) * number(row["workers"]), where
            assert abs(number(row["cold / bound"]) - cold / bound) < 0.006, where
            p50, p99, longest = (number(x) for x in row["wait p50 / p99 / max (s)"].split(" / "))
            assert 0 <= p50 <= p99 <= longest, where
            assert number(row["max share"]) >= 1.0, where
            if row["policy"] == "window":
                assert row["p99 / window's"] == "1.00", where
            if row["policy"] != "affinity":
                assert row["stolen"] == row["moves"] == "0", where
            # A job runs once, or again after its worker was stopped mid-way: never lost.
            if row["stopped"] == "0":
                assert number(row["runs"]) == jobs, where
            else:
                assert number(row["runs"]) > jobs, where

    # One worker, a whole dataset queued at once in the client's order: each adapter loaded once.
    (dataset,) = [rows for title, rows in found.items() if title.startswith("A whole dataset")]
    for row in dataset:
        assert number(row["cold loads"]) <= 1.1 * number(row["lower bound"]), row
    # Across a fleet, affinity loads fewer adapters than one shared queue does.
    for rows in found.values():
        for start in range(0, len(rows), 3):
            _, window, affinity = rows[start : start + 3]
            if affinity["workers"] != "1":
                assert number(affinity["cold loads"]) < number(window["cold loads"]), affinity
    assert re.search(r"AffinityPolicy\(shards=\d+", done.stdout)
