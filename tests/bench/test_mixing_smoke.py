"""bench/mixing.py end to end on the tiny model: a row per split, each with both timings and a ratio."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

MIXING = Path(__file__).resolve().parents[2] / "bench" / "mixing.py"


def test_mixing_prints_a_mixed_and_a_separate_timing_per_split():
    done = subprocess.run(
        [sys.executable, str(MIXING), "--models", "tiny-sd3", "--batch", "4", "--reps", "1"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in done.stdout.splitlines()]
    splits = {row[1]: row[2:] for row in rows if len(row) == 5 and row[0] == "tiny-sd3" and "+" in row[1]}
    assert set(splits) == {"3+1", "2+2"}, done.stdout
    for mixed, separate, ratio in splits.values():
        assert float(mixed.split()[0]) > 0 and float(separate.split()[0]) > 0
        assert float(ratio) > 0
