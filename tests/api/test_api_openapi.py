"""The OpenAPI document: the committed copy is what the server serves, and the server keeps to it.

Schemathesis runs as its users run it, from its command line against a real `omni-batch serve`
process (uvicorn over HTTP) with a real redis-server behind it, so posted jobs are really queued.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import requests
from fixtures.api_server import TOKEN

DOCUMENT = Path(__file__).parents[2] / "docs" / "openapi.json"
# JSON Schema cannot say every rule of a job (an output URI's bucket rules, 16 KiB of metadata as
# JSON, a job_id not ending in `.error`, the server's own output), so a request the document
# allows may still be refused with a reason: schemathesis' "schema-valid request rejected" check
# (positive_data_acceptance) is left out. Every other check runs: no 5xx, only documented statuses
# and content types, answers that match their schemas, schema-violating requests refused.
EXCLUDED_CHECKS = "positive_data_acceptance"


def test_the_committed_document_is_what_the_server_serves(start_api, redis_url: str, tmp_path: Path) -> None:
    api = start_api("--broker", redis_url, "--out", str(tmp_path / "out"), tokens=TOKEN)
    served = requests.get(f"{api.url}/openapi.json", timeout=30).json()
    assert served == json.loads(DOCUMENT.read_text()), (
        "docs/openapi.json is stale: regenerate it with `omni-batch serve --openapi > docs/openapi.json`"
    )


def test_schemathesis_finds_nothing_against_the_running_server(
    start_api, redis_url: str, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    api = start_api("--broker", redis_url, "--out", str(out), "--wait", "0", tokens=TOKEN)
    result = subprocess.run(
        [
            sys.executable, "-m", "schemathesis.cli", "run", f"{api.url}/openapi.json",
            "--header", f"Authorization: Bearer {TOKEN}",
            "--exclude-checks", EXCLUDED_CHECKS,
            "--max-examples", "20", "--seed", "1", "--no-color",
        ],
        capture_output=True, text=True, timeout=900, cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-12000:] + result.stderr[-3000:] + api.log[-3000:]
    assert "Traceback" not in api.log, api.log[-6000:]
