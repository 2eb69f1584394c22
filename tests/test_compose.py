"""docker-compose.yml, checked where Docker cannot run: against the Compose Specification's schema
(a copy of the compose-spec project's, in tests/data), and against the settings the code reads."""

from __future__ import annotations

import json
import re
from pathlib import Path

import jsonschema
import yaml

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("omni_engine", "producer", "worker")


def _compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def test_compose_file_follows_the_compose_specification():
    schema = json.loads((ROOT / "tests" / "data" / "compose-spec.json").read_text())
    jsonschema.Draft7Validator(schema).validate(_compose())


def test_every_omni_variable_it_sets_is_one_the_code_reads():
    compose = _compose()
    names = set()
    for service in compose["services"].values():
        names |= {name for name in (service.get("environment") or {}) if name.startswith("OMNI_")}
    assert names, "the compose file sets no OMNI_ variable"
    source = "\n".join(p.read_text() for package in PACKAGES for p in (ROOT / package).rglob("*.py"))
    read = set(re.findall(r'"(OMNI_[A-Z0-9_]+)"', source))
    assert names <= read, f"set in docker-compose.yml but read by no code: {sorted(names - read)}"


def test_workers_reserve_a_gpu_each_and_redis_persists():
    services = _compose()["services"]
    workers = [s for name, s in services.items() if name.startswith("worker")]
    assert workers
    for worker in workers:
        [device] = worker["deploy"]["resources"]["reservations"]["devices"]
        assert device["capabilities"] == ["gpu"] and len(device["device_ids"]) == 1
    assert "--appendonly" in services["redis"]["command"]
