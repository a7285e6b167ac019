"""Property-based bad input against the collector's own OpenAPI description (schemathesis).

Every operation in ``/openapi.json`` gets generated requests, valid (positive) and invalid
(negative: wrong types, missing fields, bodies that break the schema), sent in-process to
the ASGI app over a fresh embedded storage. Each request carries the token of the role the
route is for most of the time (so it gets past 401 into the handler) and another role's
token otherwise (the 403 paths). What must hold: no answer is a 5xx (a 5xx to bad input is
a bug: the collector must answer a precise 4xx), every status is one the description
declares, and a JSON answer conforms to its declared schema.

Bounded: ``MAX_EXAMPLES`` per operation, no example database, no deadline (the machine is
shared), so the whole module runs in well under 90 s.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from collector_helpers import Host, Local, local_collector, make_token
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sshaudit.collector.storage import TokenKind

schemathesis = pytest.importorskip(
    "schemathesis", reason="SCHEMATHESIS NOT INSTALLED: pip install schemathesis (dev extra)"
)
from schemathesis import GenerationMode  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402
from schemathesis.specs.openapi.checks import (  # noqa: E402
    response_schema_conformance,
    status_code_conformance,
)

MAX_EXAMPLES = 30
COMMITTED = Path(__file__).resolve().parent.parent / "docs" / "openapi.json"
# the operations as committed (test_collector_openapi.py keeps the file current), so each
# gets its own test id; the description served by the app is what is fuzzed
OPERATIONS = [
    (method.upper(), path)
    for path, ops in json.loads(COMMITTED.read_text())["paths"].items()
    for method in ops
]
# negative generation needs something to make invalid: parameters, a body or the token
NEGATABLE = [
    (method.upper(), path)
    for path, ops in json.loads(COMMITTED.read_text())["paths"].items()
    for method, op in ops.items()
    if {"parameters", "requestBody", "security"} & op.keys()
]
QUERY_GETS = ("/v1/sessions", "/v1/auth-events")


def intended_role(method: str, path: str) -> str:
    """The token kind a route is for (docs/collector.md "Tokens and roles")."""
    if path == "/v1/enroll":
        return "agent"
    if path.startswith("/v1/admin/"):
        return "admin"
    if method == "GET" and path.startswith(QUERY_GETS) and not path.endswith("/status"):
        return "auditor"
    return "host"


class World:
    """One in-process collector with an enrolled host and a token per role."""

    def __init__(self, local: Local, host: Host) -> None:
        self.local = local
        self.host = host
        self.schema = schemathesis.openapi.from_asgi("/openapi.json", local.client.app)

    def token(self, role: str) -> str:
        if role == "host":
            return self.host.credential
        if role == "agent":  # an enrollment token is spent by one enrollment: a fresh one
            return make_token(self.local.storage, TokenKind.AGENT, self.local.clock())
        return self.local.token(role)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    local = local_collector(tmp_path_factory.mktemp("schemathesis"))
    host = local.enroll("fuzz-host")
    yield World(local, host)
    local.client.close()


def _roles(right: str) -> st.SearchStrategy[str]:
    others = [r for r in ("admin", "auditor", "host", "agent") if r != right]
    return st.sampled_from([right] * 3 + others)


def _run(world: World, method: str, path: str, mode: GenerationMode) -> None:
    operation = world.schema[path][method]
    checks: list[Callable[..., Any]] = [not_a_server_error, status_code_conformance]
    if mode is GenerationMode.POSITIVE:
        checks.append(response_schema_conformance)

    @settings(
        max_examples=MAX_EXAMPLES // 2 if mode is GenerationMode.NEGATIVE else MAX_EXAMPLES,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(
        case=operation.as_strategy(generation_mode=mode), role=_roles(intended_role(method, path))
    )
    def probe(case: Any, role: str) -> None:
        headers = {"Authorization": f"Bearer {world.token(role)}"}
        response = case.call(headers=headers)
        case.validate_response(response, checks=checks, headers=headers)

    probe()


@pytest.mark.parametrize(("method", "path"), OPERATIONS, ids=[f"{m} {p}" for m, p in OPERATIONS])
def test_valid_requests_get_no_5xx_and_conform(world: World, method: str, path: str) -> None:
    _run(world, method, path, GenerationMode.POSITIVE)


@pytest.mark.parametrize(("method", "path"), NEGATABLE, ids=[f"{m} {p}" for m, p in NEGATABLE])
def test_invalid_requests_get_a_4xx_never_a_5xx(world: World, method: str, path: str) -> None:
    _run(world, method, path, GenerationMode.NEGATIVE)


def test_the_description_served_is_the_committed_one(world: World) -> None:
    served = world.local.client.get("/openapi.json").json()
    assert served == json.loads(COMMITTED.read_text())
    assert {(m, p) for m, p in OPERATIONS} == {
        (op.method.upper(), op.path) for op in (r.ok() for r in world.schema.get_all_operations())
    }
