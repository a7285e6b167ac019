"""docs/openapi.json is the collector's description as the code makes it (scripts/openapi)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from sshaudit.collector.openapi import openapi_document, render

ROOT = Path(__file__).resolve().parent.parent
COMMITTED = ROOT / "docs" / "openapi.json"


def test_committed_description_is_up_to_date() -> None:
    assert COMMITTED.read_text() == render(), "run scripts/openapi and commit docs/openapi.json"


def test_the_script_checks_it() -> None:
    proc = subprocess.run(
        [str(ROOT / "scripts" / "openapi"), "--check"], capture_output=True, timeout=120
    )
    assert proc.returncode == 0, proc.stdout.decode() + proc.stderr.decode()


def test_every_operation_documents_its_errors_and_auth() -> None:
    doc = openapi_document()
    public = {"/healthz", "/metrics"}
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            if path in public:
                assert "security" not in op
                continue
            assert op["security"] == [{"HTTPBearer": []}], (method, path)
            for status in ("401", "403"):
                schema = op["responses"][status]["content"]["application/json"]["schema"]
                assert schema == {"$ref": "#/components/schemas/ErrorBody"}, (method, path)
    assert json.loads(COMMITTED.read_text())["info"]["title"] == "sshaudit collector"
