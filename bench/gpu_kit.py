"""Wheels for running the worker and the benchmarks on a machine that cannot install anything.

The GPU machines this project is lent (see docs/performance.md) hold CUDA torch on Python 3.12 and
reach no package index. This downloads, here, every runtime dependency of `omni-batch[worker]`
that such a machine must be given, at the versions this checkout is tested with, built for
CPython 3.12 on manylinux x86_64, into one folder (default .whl/, git-ignored):

    python bench/gpu_kit.py            # writes .whl/*.whl and .whl/install.sh

There, with .whl carried beside the checkout, bench/gpu_run.sh installs them into /tmp/site and
runs the benchmarks (they pick CUDA when it is there). The machine's own torch, and what it is
built against, is kept.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parent.parent
# The GPU machine's own: its torch and what that is built against, and the large or compiled
# packages it holds at versions that serve as well as ours (its list: .library/device/KINDS.md).
# Everything else travels (small, and some must be as new as ours), within the device tool's 64 MiB.
KEPT = re.compile(
    r"^(torch|triton|nvidia-.*|cuda-.*|numpy|sympy|mpmath|networkx|setuptools|jinja2|markupsafe|pillow"
    r"|hf-xet|pygments|rich|markdown-it-py|pyyaml|regex|psutil|charset-normalizer)$"
)
PYTHON_VERSION = "3.12"
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux1_x86_64")
INSTALL = """#!/usr/bin/env bash
# Written by bench/gpu_kit.py: install the carried wheels where nothing can be fetched.
set -euo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \\
  --target /tmp/site "$(dirname "$0")"/*.whl
"""


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def runtime_closure(root: str, extras: tuple[str, ...]) -> dict[str, str]:
    """Every distribution `root[extras]` needs at run time, with its installed version."""
    found: dict[str, str] = {}
    todo = [(root, extras)]
    while todo:
        name, wanted = todo.pop()
        dist = metadata.distribution(name)
        for line in dist.requires or []:
            requirement = Requirement(line)
            environments = [{"extra": extra} for extra in wanted] or [{"extra": ""}]
            marker = requirement.marker
            if marker is not None and not any(marker.evaluate(env) for env in environments):
                continue
            key = _canonical(requirement.name)
            try:
                version = metadata.version(requirement.name)
            except metadata.PackageNotFoundError:
                continue  # an optional dependency this environment does not have
            if key not in found:
                found[key] = version
                todo.append((requirement.name, tuple(requirement.extras)))
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dest", type=Path, default=ROOT / ".whl")
    args = parser.parse_args(argv)
    pins = {name: v for name, v in runtime_closure("omni-batch", ("worker",)).items() if not KEPT.match(name)}
    args.dest.mkdir(parents=True, exist_ok=True)
    platforms = [flag for platform in PLATFORMS for flag in ("--platform", platform)]
    command = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:"]
    command += ["--python-version", PYTHON_VERSION, "--implementation", "cp", *platforms]
    command += ["-d", str(args.dest)]
    subprocess.run([*command, *(f"{name}=={version}" for name, version in sorted(pins.items()))], check=True)
    (args.dest / "install.sh").write_text(INSTALL)
    size = sum(f.stat().st_size for f in args.dest.glob("*.whl"))
    print(f"gpu_kit: {len(pins)} distributions, {size / 2**20:.1f} MiB in {args.dest}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
