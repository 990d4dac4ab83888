"""Fuzz the HTTP API from its own OpenAPI document (schemathesis) against a real server on the real stack.

One server process (all roles, fault drill enabled) on a schema, topics, consumer group and Redis prefix of
its own serves the whole module. Every operation of the document (the one that server serves at
``/api/openapi.json``) is one test: ``MAX_EXAMPLES`` generated requests, valid and invalid, derandomized so a
run is repeatable, plus schemathesis's explicit examples and deterministic coverage cases. No response may
be a 5xx, and each must match the document: a documented status code, its media type, headers and body
schema. The SSE stream is read up to its first event only.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import CHECKS, CheckFunction, is_check_class, load_all_checks, max_response_time

import broadcast
from broadcast.admin import api as admin_api
from broadcast.core.settings import Settings
from broadcast.runtime import openapi
from devstack.servers import Server, isolated_env
from devstack.stack import StackInfo
from devstack.topics import delete_scratch_topics
from tests.auth import bearer

pytestmark = pytest.mark.stack

CHECKOUT = Path(broadcast.__file__).resolve().parents[1]
MAX_EXAMPLES = 25
REQUEST_TIMEOUT_S = 10.0


def all_checks() -> list[CheckFunction]:
    """Every check schemathesis has: each registered one (built-in and OpenAPI) and the response-time limit."""
    load_all_checks()
    checks = [c for c in CHECKS.get_all() if not is_check_class(c)] + [max_response_time]
    return checks


ALL_CHECKS = all_checks()
DOCUMENT = openapi.build_document(openapi.Bounds.of(Settings()))
# Loaded here, not through `schemathesis.pytest.from_fixture` (which could load it from the server): that
# loader sets `Function._nodeid`, which pytest 9.2 no longer has. The fixture checks the server serves this.
schema = schemathesis.openapi.from_dict(
    DOCUMENT,
    # An event stream never ends: read it up to its first event (or the timeout), then close it.
    # `allow-extra-parameters: false`: an undeclared header makes no request invalid (RFC 9110 §5.1: a recipient
    # ignores header fields it does not recognise; proxies add them), so the negative cases that add one would
    # fail a correct server. Unknown query parameters and body fields, which the server refuses (400), are
    # covered by tests/unit/test_api_contract.py and tests/unit/test_schemas.py instead.
    config=schemathesis.Config.from_dict(
        {"seed": 20240601, "max-stream-events": 1, "generation": {"allow-extra-parameters": False}}
    ),
)
requests_made: list[tuple[str, int]] = []
# Lists whose `cursor` is an opaque token (the dead-letter list's is a plain id: any one is valid).
OPAQUE_CURSOR_PATHS = {"/api/admin/broadcasts", "/api/admin/broadcasts/{id}/deliveries", "/api/user/messages"}


def auth_headers() -> dict[str, str]:
    """The headers that sign the fuzz in as an admin: the only place that knows the auth mechanism."""
    return bearer("fuzz-admin", "admin")


@pytest.fixture(scope="module")
def fuzzed_server(stack: StackInfo, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A server of this module's own, running the code this test imported (this checkout's, not whichever
    one the virtualenv's editable install points at); its topics are deleted afterwards."""
    name = "t" + uuid.uuid4().hex[:10]  # the shape of `unique_name`, but for the whole module
    directory = tmp_path_factory.mktemp("fuzz")
    try:
        env = isolated_env(
            stack, name, directory, PYTHONPATH=str(CHECKOUT), BROADCAST_TESTING__FAULT_DRILL_ENABLED="true"
        )
        server = Server(env, directory, name="fuzzed")
        started = time.monotonic()
        try:
            server.wait_live()
            served = httpx.get(server.base + openapi.OPENAPI_PATH, timeout=10).json()
            assert served == DOCUMENT, "the server's settings differ from the defaults the fuzz was generated for"
            yield server
        finally:
            code = server.stop()
            statuses = sorted({s for _, s in requests_made})
            print(
                f"\nfuzz: {len(requests_made)} requests in {time.monotonic() - started:.1f} s, statuses {statuses}; "
                f"server log {server.log}"
            )
    finally:
        asyncio.run(delete_scratch_topics(stack.kafka_bootstrap, {name}))
    assert code == 0, f"the server did not stop cleanly ({code}):\n{server.log.read_text()[-6000:]}"


@schema.parametrize()
@settings(
    max_examples=MAX_EXAMPLES,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=list(HealthCheck),
)
def test_fuzz_api(case: schemathesis.Case[Any], fuzzed_server: Server) -> None:
    without_a_made_up_cursor(case)
    with_times_to_come(case)
    without_a_reserved_user_id(case)
    with_a_csv_file(case)
    response = case.call(base_url=fuzzed_server.base, headers=auth_headers(), timeout=REQUEST_TIMEOUT_S)
    requests_made.append((case.operation.label, response.status_code))
    if response.status_code >= 500:  # shown with the failure: the server's side of it
        print(f"{case.operation.label} -> {response.status_code}; server log:\n{_log_tail(fuzzed_server)}")
    case.validate_response(response, checks=ALL_CHECKS, headers=auth_headers())


def without_a_made_up_cursor(case: schemathesis.Case[Any]) -> None:
    """An opaque page cursor is valid only when the server issued it, which no schema can say: a generated
    one names no page (400). A positive case therefore goes without one, i.e. asks for the first page;
    negative ones (e.g. over the documented length) still go out as generated."""
    opaque = case.operation.path in OPAQUE_CURSOR_PATHS
    if opaque and case.meta is not None and case.meta.generation.mode.is_positive and case.query:
        case.query.pop("cursor", None)


def with_times_to_come(case: schemathesis.Case[Any]) -> None:
    """A broadcast's ``expiresAt`` must lie ahead (a decision of the API: an expiry that has passed is a 400),
    which no schema can say: a positive case gets an expiry a day ahead, after any ``scheduledAt``, which
    moves an hour ahead."""
    body = case.body
    if not wholly_positive(case) or not isinstance(body, dict):
        return
    now = datetime.now(UTC)
    if body.get("scheduledAt") is not None:
        body["scheduledAt"] = (now + timedelta(hours=1)).isoformat()
    if body.get("expiresAt") is not None:
        body["expiresAt"] = (now + timedelta(days=1)).isoformat()


def without_a_reserved_user_id(case: schemathesis.Case[Any]) -> None:
    """``bulk`` names the bulk import, not a user: the document says so (``not: {const: bulk}``), but the
    generator does not honour ``not`` for path parameters; a positive case names another user."""
    params = case.path_parameters
    if wholly_positive(case) and params and params.get("id") == "bulk":
        params["id"] = "bulk-user"


def wholly_positive(case: schemathesis.Case[Any]) -> bool:
    """A case none of whose parts (query, headers, body...) was made invalid on purpose."""
    meta = case.meta
    return meta is not None and all(info.mode.is_positive for info in meta.components.values())


def with_a_csv_file(case: schemathesis.Case[Any]) -> None:
    """The CSV upload's file must be UTF-8 lines of user ids, which a schema (``format: binary``) cannot say:
    a positive case uploads such a file; negative ones go out as generated."""
    if wholly_positive(case) and case.operation.path == admin_api.CSV_PATH and isinstance(case.body, dict):
        case.body["file"] = "userId\nalice\nbob\n"


def _log_tail(server: Server, chars: int = 8000) -> str:
    return server.log.read_text(errors="replace")[-chars:]
