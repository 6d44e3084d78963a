"""Schemathesis against the live hub's own /api/v1/openapi.json, with an admin token.

Every operation but the endless event stream gets property-based requests
generated from the document (bodies, path and query parameters), valid ones
(positive) and invalid ones (negative: wrong types, missing or unknown
fields, out-of-range values); each answer
must not be a 5xx, its status must be one the document lists for the
operation, its content type the documented one, and its body must match the
documented schema. The store is seeded first (devices, a deployment, a
rollout), so that generated requests also meet real records.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)
from schemathesis.core.result import Ok

from sync.keys import Signer
from tests.hub.api_harness import HubThread, enroll_body
from tests.hub.test_api import manifest

POSITIVE_EXAMPLES = 50
NEGATIVE_EXAMPLES = 25
SKIPPED = {("GET", "/api/v1/events/stream")}  # never ends: covered in test_api_events
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]


def _seed(hub: HubThread, session: requests.Session) -> None:
    token = hub.enrollment_token(max_uses=3)
    for _ in range(3):
        body = enroll_body(token, Signer.generate().public_key_bytes)
        assert session.post(f"{hub.url}/api/v1/enroll", json=body, timeout=10).status_code == 201
    resp = session.post(f"{hub.url}/api/v1/deployments", json=manifest(), timeout=10)
    assert resp.status_code == 201, resp.text


def test_schemathesis_no_5xx_and_conforming_statuses(tmp_path: Path) -> None:
    started = time.monotonic()
    with HubThread(tmp_path) as hub, requests.Session() as session:
        auth = {"Authorization": f"Bearer {hub.token('admin')}"}
        session.headers.update(auth)
        _seed(hub, session)
        doc = session.get(f"{hub.url}/api/v1/openapi.json", timeout=10).json()
        schema = schemathesis.openapi.from_dict(doc)
        ran: list[str] = []
        statuses: dict[str, set[int]] = {}
        for result in schema.get_all_operations():
            assert isinstance(result, Ok), result
            operation = result.ok()
            if (operation.method.upper(), operation.path) in SKIPPED:
                continue
            label = f"{operation.method.upper()} {operation.path}"
            seen = statuses.setdefault(label, set())

            for mode, examples in (
                (GenerationMode.POSITIVE, POSITIVE_EXAMPLES),
                (GenerationMode.NEGATIVE, NEGATIVE_EXAMPLES),
            ):
                fuzz = _fuzz(
                    strategy=operation.as_strategy(mode),
                    examples=examples,
                    url=hub.url,
                    session=session,
                    auth=auth,
                    seen=seen,
                )
                try:
                    fuzz()
                except Unsatisfiable:  # nothing to get wrong: no parameters, no body
                    assert mode is GenerationMode.NEGATIVE, label
            ran.append(label)
    assert len(ran) == len(doc_operations(doc)) - len(SKIPPED)
    # the run reached the handlers, not only the validators
    assert 200 in statuses["GET /api/v1/devices"]
    assert 201 in statuses["POST /api/v1/enrollment-tokens"] | statuses["POST /api/v1/tokens"]
    assert time.monotonic() - started < 120


def _fuzz(
    *,
    strategy: Any,
    examples: int,
    url: str,
    session: requests.Session,
    auth: dict[str, str],
    seen: set[int],
) -> Any:
    @settings(
        max_examples=examples,
        deadline=None,
        derandomize=True,
        database=None,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(case=strategy)
    def check(case: Any) -> None:
        response = case.call(base_url=url, session=session, headers=auth, timeout=10)
        seen.add(response.status_code)
        case.validate_response(response, checks=CHECKS)

    return check


def doc_operations(doc: dict[str, Any]) -> list[tuple[str, str]]:
    return [(m, p) for p, item in doc["paths"].items() for m in item]
