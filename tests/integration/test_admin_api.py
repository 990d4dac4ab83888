"""The admin HTTP API on the real stack (PostgreSQL, Kafka, Redis): what an admin sees, and what gets written.

Each test gets its own PostgreSQL schema. The outbox relay is not started, so the outbox rows a request
wrote stay countable; every refused request is checked to have written nothing at all.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import httpx
import pytest
from sqlalchemy import func, select, table, text
from sqlalchemy.ext.asyncio import AsyncEngine

from broadcast.core.settings import LimitsSettings
from devstack.stack import StackInfo
from tests.apps import api_in_process
from tests.auth import bearer

ADMIN = bearer("admin-ann", "admin")
BROADCASTS = "/api/admin/broadcasts"
PROBLEM = "application/problem+json"
MAX_CSV_ROWS = 6_000
MAX_CSV_BYTES = 256 * 1024
MAX_BULK_USERS = 100
TABLES = ("broadcast_messages", "user_broadcast_messages", "outbox_events", "users", "user_roles")


@dataclass
class Api:
    http: httpx.AsyncClient
    engine: AsyncEngine

    async def rows(self) -> dict[str, int]:
        async with self.engine.connect() as conn:
            return {t: (await conn.execute(select(func.count()).select_from(table(t)))).scalar_one() for t in TABLES}

    async def outbox(self, broadcast_id: str) -> list[str]:
        async with self.engine.connect() as conn:
            query = text("SELECT event_type FROM outbox_events WHERE broadcast_id = :b ORDER BY id")
            return list((await conn.execute(query, {"b": broadcast_id})).scalars())

    async def create(self, body: dict[str, Any], **headers: str) -> dict[str, Any]:
        response = await self.http.post(BROADCASTS, json=body, headers={**ADMIN, **headers})
        assert response.status_code == 201, response.text
        created: dict[str, Any] = response.json()
        return created


@pytest.fixture
async def api(stack: StackInfo, unique_name: str) -> AsyncIterator[Api]:
    limits = LimitsSettings(max_csv_rows=MAX_CSV_ROWS, max_csv_bytes=MAX_CSV_BYTES, max_bulk_users=MAX_BULK_USERS)
    async with api_in_process(stack, unique_name, limits=limits) as (http, engine):
        yield Api(http, engine)


def at(**delta: float) -> str:
    return (datetime.now(UTC) + timedelta(**delta)).isoformat()


def assert_problem(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == PROBLEM
    body: dict[str, Any] = response.json()
    assert body["status"] == status and body["title"]
    assert "Traceback" not in response.text
    return body


# --------------------------------------------------------------------------- creating broadcasts
async def test_selected_broadcast_is_created_with_its_rows_and_events(api: Api) -> None:
    response = await api.http.post(
        BROADCASTS,
        json={"content": "  Deploy at 22:00  ", "targetType": "SELECTED", "targetIds": ["u1", "u2", "u2", "u3"]},
        headers={**ADMIN, "X-Correlation-ID": "corr-42"},
    )
    assert response.status_code == 201, response.text
    body = response.json()
    assert response.headers["location"] == f"{BROADCASTS}/{body['id']}"
    assert response.headers["x-correlation-id"] == "corr-42"
    assert body["senderId"] == "admin-ann" and body["content"] == "  Deploy at 22:00  "
    assert body["targetType"] == "SELECTED" and body["targetedCount"] == 3 and body["status"] == "ACTIVE"
    assert body["priority"] == "NORMAL" and body["fireAndForget"] is False and body["correlationId"] == "corr-42"
    assert datetime.fromisoformat(body["createdAt"]).tzinfo is not None

    fetched = await api.http.get(response.headers["location"], headers=ADMIN)
    assert fetched.status_code == 200 and fetched.json() == body
    assert await api.outbox(body["id"]) == ["CREATED"] * 3
    assert (await api.rows())["user_broadcast_messages"] == 3


async def test_a_target_id_with_surrounding_spaces_is_refused_not_trimmed(api: Api) -> None:
    """Ids are taken as sent, as PUT /api/admin/users/{id} takes them: " u3" is not u3 (it used to be trimmed)."""
    response = await api.http.post(
        BROADCASTS, json={"content": "x", "targetType": "SELECTED", "targetIds": ["u1", " u3"]}, headers=ADMIN
    )
    assert response.status_code == 400 and "u3" in response.json()["detail"], response.text


@pytest.mark.parametrize("content", ["trail\r", "  both  ", "\tlead", "line\n\n", "\u00a0nbsp"])
async def test_content_is_kept_exactly_as_sent(api: Api, content: str) -> None:
    created = await api.create({"content": content, "targetType": "SELECTED", "targetIds": ["u1"]})
    assert created["content"] == content
    fetched = await api.http.get(f"{BROADCASTS}/{created['id']}", headers=ADMIN)
    assert fetched.json()["content"] == content


STAMP = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{6}Z$")


async def test_timestamps_are_rfc3339_utc_with_microseconds_in_admin_api_and_inbox(api: Api) -> None:
    expires = (datetime.now(UTC) + timedelta(days=1)).replace(microsecond=0).astimezone(timezone(timedelta(hours=-3)))
    created = await api.create(
        {"content": "when", "targetType": "SELECTED", "targetIds": ["u1"], "expiresAt": expires.isoformat()}
    )
    stamps = [created["createdAt"], created["updatedAt"], created["expiresAt"]]
    assert all(STAMP.match(s) for s in stamps), stamps
    listed = (await api.http.get(BROADCASTS, headers=ADMIN)).json()["items"][0]
    assert [listed["createdAt"], listed["updatedAt"], listed["expiresAt"]] == stamps
    inbox = (await api.http.get("/api/user/messages", headers=bearer("u1"))).json()["items"][0]
    assert [inbox["createdAt"], inbox["expiresAt"]] == [stamps[0], stamps[2]]


async def test_a_correlation_id_is_made_up_when_none_is_sent(api: Api) -> None:
    response = await api.http.post(BROADCASTS, json={"content": "hi", "targetType": "ALL"}, headers=ADMIN)
    assert response.status_code == 201
    assert len(response.headers["x-correlation-id"]) == 32
    assert response.json()["correlationId"] == response.headers["x-correlation-id"]


@pytest.mark.parametrize("given", ["c" * 201, "tab\there", "caf\u00e9"], ids=["too long", "control", "non-ASCII"])
async def test_an_invalid_correlation_id_is_replaced_not_refused(api: Api, given: str) -> None:
    headers = [*((k.encode(), v.encode()) for k, v in ADMIN.items()), (b"X-Correlation-ID", given.encode())]
    for method, path, body in [("POST", BROADCASTS, ALL), ("GET", BROADCASTS, None), ("GET", "/health/live", None)]:
        response = await api.http.request(method, path, json=body, headers=headers)
        assert response.status_code in (200, 201), response.text
        used = response.headers["x-correlation-id"]
        assert len(used) == 32 and used != given
        if method == "POST":
            assert response.json()["correlationId"] == used


async def test_all_and_role_audiences_count_users_from_the_users_api(api: Api) -> None:
    users = [
        {"id": "ann", "roles": ["ops", "dev"]},
        {"id": "bob", "displayName": "Bob", "roles": ["ops"]},
        {"id": "cid", "roles": ["dev"]},
        {"id": "dan", "roles": ["sales"]},
        {"id": "eve"},
    ]
    imported = await api.http.post("/api/admin/users/bulk", json=users, headers=ADMIN)
    assert imported.status_code == 200 and imported.json() == {"imported": 5}
    put = await api.http.put("/api/admin/users/fay", json={"roles": ["dev", "qa"]}, headers=ADMIN)
    assert put.status_code == 200

    everyone = await api.create({"content": "hello all", "targetType": "ALL", "priority": "HIGH"})
    assert everyone["targetedCount"] == 6 and everyone["targetRoles"] == [] and everyone["priority"] == "HIGH"
    roles = await api.create({"content": "ops and dev", "targetType": "ROLE", "targetIds": ["ops", "dev"]})
    assert roles["targetedCount"] == 4  # ann holds both roles and counts once: ann, bob, cid, fay
    assert roles["targetRoles"] == ["ops", "dev"]
    nobody = await api.create({"content": "nobody", "targetType": "ROLE", "targetIds": ["ghosts"]})
    assert nobody["targetedCount"] == 0
    for b in (everyone, roles):
        assert await api.outbox(b["id"]) == ["CREATED"]  # one group event, not one per user
    assert (await api.rows())["user_broadcast_messages"] == 0


async def test_scheduled_broadcast_keeps_its_times(api: Api) -> None:
    scheduled, expires = at(days=1), at(days=2)
    body = await api.create(
        {"content": "later", "targetType": "ALL", "scheduledAt": scheduled, "expiresAt": expires, "category": "ops"}
    )
    assert body["status"] == "SCHEDULED" and body["category"] == "ops"
    assert datetime.fromisoformat(body["scheduledAt"]) == datetime.fromisoformat(scheduled)
    assert datetime.fromisoformat(body["expiresAt"]) == datetime.fromisoformat(expires)


async def test_idempotency_key_replays_the_first_answer_and_refuses_a_different_body(api: Api) -> None:
    request = {"content": "once", "targetType": "SELECTED", "targetIds": ["u1", "u2"]}
    first = await api.http.post(BROADCASTS, json=request, headers={**ADMIN, "Idempotency-Key": "k-1"})
    assert first.status_code == 201 and "idempotent-replayed" not in first.headers
    again = await api.http.post(BROADCASTS, json=request, headers={**ADMIN, "Idempotency-Key": "k-1"})
    assert again.status_code == 200 and again.headers["idempotent-replayed"] == "true"
    assert again.json() == first.json()
    assert again.headers["location"] == first.headers["location"]
    before = await api.rows()

    changed = await api.http.post(
        BROADCASTS, json={**request, "content": "twice"}, headers={**ADMIN, "Idempotency-Key": "k-1"}
    )
    assert_problem(changed, 409)
    assert await api.rows() == before
    assert before["broadcast_messages"] == 1 and before["outbox_events"] == 2


# --------------------------------------------------------------------------- reading, cancelling
async def test_list_filters_by_status_and_pages_with_a_cursor(api: Api) -> None:
    active = [(await api.create({"content": f"a{i}", "targetType": "ALL"}))["id"] for i in range(5)]
    scheduled = [
        (await api.create({"content": f"s{i}", "targetType": "ALL", "scheduledAt": at(hours=5)}))["id"]
        for i in range(2)
    ]
    cancelled = await api.http.delete(f"{BROADCASTS}/{active.pop()}", headers=ADMIN)
    assert cancelled.status_code == 200

    seen: list[str] = []
    cursor: str | None = None
    pages = 0
    while True:
        params = {"status": "ACTIVE", "limit": "3", **({"cursor": cursor} if cursor else {})}
        page = await api.http.get(BROADCASTS, params=params, headers=ADMIN)
        assert page.status_code == 200, page.text
        body = page.json()
        assert all(item["status"] == "ACTIVE" for item in body["items"])
        seen += [item["id"] for item in body["items"]]
        pages += 1
        cursor = body["nextCursor"]
        if cursor is None:
            break
    assert pages == 2 and len(seen) == len(set(seen)) and set(seen) == set(active)

    listed = await api.http.get(BROADCASTS, params={"status": "SCHEDULED"}, headers=ADMIN)
    assert {b["id"] for b in listed.json()["items"]} == set(scheduled) and listed.json()["nextCursor"] is None
    every = await api.http.get(BROADCASTS, headers=ADMIN)
    assert len(every.json()["items"]) == 7


async def test_cancel_answers_the_cancelled_broadcast_and_refuses_a_second_time(api: Api) -> None:
    created = await api.create({"content": "oops", "targetType": "SELECTED", "targetIds": ["u1"]})
    url = f"{BROADCASTS}/{created['id']}"
    cancelled = await api.http.delete(url, headers=ADMIN)
    assert cancelled.status_code == 200 and cancelled.json()["status"] == "CANCELLED"
    assert cancelled.json()["id"] == created["id"]
    assert (await api.http.get(url, headers=ADMIN)).json()["status"] == "CANCELLED"
    events = await api.outbox(created["id"])
    assert events.count("CANCELLED") == 1

    before = await api.rows()
    again = await api.http.delete(url, headers=ADMIN)
    assert "CANCELLED" in assert_problem(again, 409)["detail"]
    assert await api.rows() == before


async def test_stats_of_a_cancelled_broadcast_show_nothing_pending(api: Api) -> None:
    await api.http.post("/api/admin/users/bulk", json=[{"id": u} for u in ("ann", "bob", "cid")], headers=ADMIN)
    everyone = await api.create({"content": "all", "targetType": "ALL"})
    one = await api.create({"content": "one", "targetType": "SELECTED", "targetIds": ["ann"]})
    for created, targeted in ((everyone, 3), (one, 1)):
        assert (await api.http.delete(f"{BROADCASTS}/{created['id']}", headers=ADMIN)).status_code == 200
        stats = (await api.http.get(f"{BROADCASTS}/{created['id']}/stats", headers=ADMIN)).json()
        assert (stats["targeted"], stats["delivered"], stats["read"], stats["failed"]) == (targeted, 0, 0, 0)
        assert (stats["pending"], stats["cancelled"], stats["expired"]) == (0, targeted, 0)


async def test_stats_and_deliveries_pages(api: Api) -> None:
    recipients = [f"user-{i}" for i in range(7)]
    created = await api.create({"content": "count me", "targetType": "SELECTED", "targetIds": recipients})
    url = f"{BROADCASTS}/{created['id']}"
    stats = await api.http.get(f"{url}/stats", headers=ADMIN)
    assert stats.status_code == 200
    assert stats.json() == {
        "broadcastId": created["id"],
        "targeted": 7,
        "delivered": 0,
        "read": 0,
        "failed": 0,
        "pending": 7,
        "cancelled": 0,
        "expired": 0,
        "deliveryRate": 0.0,
        "readRate": 0.0,
    }

    seen: list[dict[str, Any]] = []
    sizes: list[int] = []
    cursor: str | None = None
    while True:
        params = {"limit": "3", **({"cursor": cursor} if cursor else {})}
        page = (await api.http.get(f"{url}/deliveries", params=params, headers=ADMIN)).json()
        seen += page["items"]
        sizes.append(len(page["items"]))
        cursor = page["nextCursor"]
        if cursor is None:
            break
    assert sizes == [3, 3, 1]
    assert sorted(d["userId"] for d in seen) == sorted(recipients)
    assert {(d["deliveryStatus"], d["readStatus"], d["deliveredAt"], d["readAt"]) for d in seen} == {
        ("PENDING", "UNREAD", None, None)
    }


@pytest.mark.parametrize("suffix", ["", "/stats", "/deliveries"])
@pytest.mark.parametrize("broadcast_id", ["7d0f6a9e-1b5c-4c1e-9a53-0d7b1e2f3a4b", "not-a-uuid", "1" * 300])
async def test_unknown_broadcasts_are_404(api: Api, broadcast_id: str, suffix: str) -> None:
    response = await api.http.get(f"{BROADCASTS}/{broadcast_id}{suffix}", headers=ADMIN)
    assert_problem(response, 404)


async def test_cancelling_an_unknown_broadcast_is_404(api: Api) -> None:
    assert_problem(await api.http.delete(f"{BROADCASTS}/7d0f6a9e-1b5c-4c1e-9a53-0d7b1e2f3a4b", headers=ADMIN), 404)
    assert_problem(await api.http.delete(f"{BROADCASTS}/nope", headers=ADMIN), 404)


@pytest.mark.parametrize(
    ("params", "needle"),
    [
        ({"cursor": "!!not-a-cursor!!"}, "cursor"),
        ({"cursor": "x" * 5000}, "cursor"),
        ({"cursor": "WyIwMDAxLTAxLTAxVDAwOjAwOjAwKzAxOjAwIiwieCJd"}, "cursor"),  # ["0001-01-01T00:00:00+01:00","x"]
        ({"limit": "0"}, "limit"),
        ({"limit": "100000"}, "limit"),
        ({"limit": "ten"}, "limit"),
        ({"limit": "-1"}, "limit"),
        ({"status": "DONE"}, "status"),
    ],
)
async def test_bad_listing_parameters_are_400(api: Api, params: dict[str, str], needle: str) -> None:
    assert needle in assert_problem(await api.http.get(BROADCASTS, params=params, headers=ADMIN), 400)["detail"]


@pytest.mark.parametrize("params", [{"cursor": "abc"}, {"limit": "0"}, {"limit": "100000"}])
async def test_bad_delivery_page_parameters_are_400(api: Api, params: dict[str, str]) -> None:
    created = await api.create({"content": "x", "targetType": "SELECTED", "targetIds": ["u1"]})
    assert_problem(await api.http.get(f"{BROADCASTS}/{created['id']}/deliveries", params=params, headers=ADMIN), 400)


# --------------------------------------------------------------------------- CSV upload
def csv_upload(
    data: bytes, **fields: str
) -> dict[str, Any]:  # keyword arguments for httpx: the `file` part plus form fields
    return {"files": {"file": ("recipients.csv", data, "text/csv")}, "data": {"content": "from csv", **fields}}


async def test_csv_upload_of_5000_ids_with_duplicates(api: Api) -> None:
    ids = [f"user-{i:05d}" for i in range(5_000)]
    lines = ["userId", *ids, "", *ids[:250], "   "]
    data = b"\xef\xbb\xbf" + "\r\n".join(lines).encode()
    response = await api.http.post(
        f"{BROADCASTS}/csv",
        headers={**ADMIN, "Idempotency-Key": "csv-1"},
        **csv_upload(data, priority="URGENT", fireAndForget="false", category="", expiresAt=at(days=1)),
    )
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["recipients"] == {"accepted": 5_000, "duplicates": 250}
    assert body["targetType"] == "SELECTED" and body["targetedCount"] == 5_000 and body["priority"] == "URGENT"
    assert body["category"] is None and body["senderId"] == "admin-ann"
    assert response.headers["location"] == f"{BROADCASTS}/{body['id']}"
    rows = await api.rows()
    assert rows["user_broadcast_messages"] == 5_000 and rows["outbox_events"] == 5_000

    deliveries = await api.http.get(f"{BROADCASTS}/{body['id']}/deliveries", params={"limit": "500"}, headers=ADMIN)
    assert deliveries.json()["items"][0]["userId"] == "user-00000"

    replay = await api.http.post(
        f"{BROADCASTS}/csv",
        headers={**ADMIN, "Idempotency-Key": "csv-1"},
        **csv_upload(data, priority="URGENT", fireAndForget="false", category="", expiresAt=body["expiresAt"]),
    )
    assert replay.status_code == 200 and replay.headers["idempotent-replayed"] == "true"
    assert replay.json()["id"] == body["id"]
    assert await api.rows() == rows


async def test_csv_upload_takes_the_create_fields_as_form_fields(api: Api) -> None:
    fields = {"targetType": "SELECTED", "fireAndForget": "true", "scheduledAt": at(days=1), "priority": "LOW"}
    response = await api.http.post(f"{BROADCASTS}/csv", headers=ADMIN, **csv_upload(b"u1\nu2\n", **fields))
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["targetType"] == "SELECTED" and body["fireAndForget"] is True and body["status"] == "SCHEDULED"
    assert body["priority"] == "LOW" and body["recipients"] == {"accepted": 2, "duplicates": 0}


# --------------------------------------------------------------------------- users
async def test_users_put_get_and_replace_roles(api: Api) -> None:
    url = "/api/admin/users/ann@example.com"
    first = await api.http.put(url, json={"displayName": "Ann", "roles": ["ops", "dev", "ops"]}, headers=ADMIN)
    assert first.status_code == 200
    assert first.json() == {"id": "ann@example.com", "displayName": "Ann", "roles": ["dev", "ops"]}
    assert (await api.http.get(url, headers=ADMIN)).json() == first.json()

    replaced = await api.http.put(url, json={"roles": ["qa"]}, headers=ADMIN)
    assert replaced.json() == {"id": "ann@example.com", "displayName": "", "roles": ["qa"]}
    assert (await api.http.get(url, headers=ADMIN)).json()["roles"] == ["qa"]
    assert (await api.rows())["users"] == 1
    assert_problem(await api.http.get("/api/admin/users/nobody", headers=ADMIN), 404)


async def test_bulk_import_of_the_maximum_with_a_repeated_id(api: Api) -> None:
    users = [{"id": f"u{i}", "roles": ["staff"]} for i in range(MAX_BULK_USERS - 1)]
    users.append({"id": "u0", "displayName": "Zero", "roles": ["boss"]})
    response = await api.http.post("/api/admin/users/bulk", json=users, headers=ADMIN)
    assert response.status_code == 200 and response.json() == {"imported": MAX_BULK_USERS - 1}
    zero = await api.http.get("/api/admin/users/u0", headers=ADMIN)
    assert zero.json() == {"id": "u0", "displayName": "Zero", "roles": ["boss"]}
    assert (await api.rows())["users"] == MAX_BULK_USERS - 1


# --------------------------------------------------------------------------- refused input writes nothing
@dataclass(frozen=True)
class Bad:
    """One refused request: what is sent, the status expected, and a text the problem must contain."""

    name: str
    request: dict[str, Any]
    status: int
    needle: str
    path: str = BROADCASTS
    method: str = "POST"

    def __str__(self) -> str:
        return self.name


def json_post(body: object, **headers: str) -> dict[str, Any]:
    return {"json": body, "headers": {**ADMIN, **headers}}


def raw_post(content: bytes, content_type: str | None) -> dict[str, Any]:
    headers = {**ADMIN, **({"Content-Type": content_type} if content_type else {})}
    return {"content": content, "headers": headers}


def csv_post(data: bytes, **fields: str) -> dict[str, Any]:
    return {**csv_upload(data, **fields), "headers": ADMIN}


CSV = f"{BROADCASTS}/csv"
ALL = {"content": "hi", "targetType": "ALL"}
BAD_INPUT = [
    Bad("unknown targetType", json_post({"content": "hi", "targetType": "EVERYONE"}), 400, "targetType"),
    Bad("unknown priority", json_post({**ALL, "priority": "BLOCKER"}), 400, "priority"),
    Bad("empty content", json_post({**ALL, "content": ""}), 400, "content must not be empty"),
    Bad("whitespace content", json_post({**ALL, "content": " \n\t  "}), 400, "content must not be empty"),
    Bad("content over the limit", json_post({**ALL, "content": "x" * 10_001}), 400, "10000 characters"),
    Bad("1 MB content", json_post({**ALL, "content": "x" * 1_048_576}), 413, "exceeds 1048576 bytes"),
    Bad("targetIds for ALL", json_post({**ALL, "targetIds": ["u1"]}), 400, "targetIds must be empty"),
    Bad("SELECTED without ids", json_post({"content": "hi", "targetType": "SELECTED"}), 400, "at least one"),
    Bad(
        "more JSON ids than allowed",
        json_post({"content": "hi", "targetType": "SELECTED", "targetIds": [f"u{i}" for i in range(10_001)]}),
        400,
        "upload a CSV",
    ),
    Bad("bad role name", json_post({"content": "hi", "targetType": "ROLE", "targetIds": ["ops team"]}), 400, "role"),
    Bad("past expiresAt", json_post({**ALL, "expiresAt": at(hours=-1)}), 400, "expiresAt is in the past"),
    Bad(
        "expiresAt before scheduledAt",
        json_post({**ALL, "scheduledAt": at(days=2), "expiresAt": at(days=1)}),
        400,
        "after scheduledAt",
    ),
    Bad(
        "scheduledAt before UTC can hold it",
        json_post({**ALL, "scheduledAt": "0001-01-01T00:00:00+01:00"}),
        400,
        "out of range",
    ),
    Bad(
        "expiresAt after UTC can hold it",
        json_post({**ALL, "expiresAt": "9999-12-31T23:59:59-05:00"}),
        400,
        "out of range",
    ),
    Bad("expiresAt without offset", json_post({**ALL, "expiresAt": "2099-01-01T10:00:00"}), 400, "expiresAt"),
    Bad("fireAndForget as a string", json_post({**ALL, "fireAndForget": "yes"}), 400, "fireAndForget"),
    Bad("fireAndForget as a number", json_post({**ALL, "fireAndForget": 1}), 400, "fireAndForget"),
    Bad("scheduledAt as a number", json_post({**ALL, "scheduledAt": 1893456000}), 400, "scheduledAt"),
    Bad("expiresAt as digits", json_post({**ALL, "expiresAt": "1893456000"}), 400, "expiresAt"),
    Bad("unknown field", json_post({**ALL, "senderId": "mallory"}), 400, "senderId"),
    Bad("snake_case field", json_post({"content": "hi", "target_type": "ALL"}), 400, "target_type"),
    Bad("JSON array", json_post([ALL]), 400, "(body)"),
    Bad("no bearer token", {"json": ALL}, 401, "bearer token"),
    Bad("wrong content type", raw_post(b'{"content": "hi", "targetType": "ALL"}', "text/plain"), 415, "json"),
    Bad("no content type", raw_post(b'{"content": "hi", "targetType": "ALL"}', None), 415, "json"),
    Bad("invalid JSON", raw_post(b'{"content": "hi", ', "application/json"), 400, "not valid JSON"),
    Bad("empty body", raw_post(b"", "application/json"), 400, "empty"),
    Bad("long Idempotency-Key", json_post(ALL, **{"Idempotency-Key": "k" * 201}), 400, "Idempotency-Key"),
    Bad(
        "malformed CSV",
        csv_post(b"userId\nalice\nbob,carol\n\nok\n\xff\xfe\n"),
        400,
        "first: line 3",
        path=CSV,
    ),
    Bad("CSV with more rows than allowed", csv_post(b"u\n" * (MAX_CSV_ROWS + 1)), 413, "6000", path=CSV),
    Bad("CSV over max_csv_bytes", csv_post(b"".join(b"%0100d\n" % i for i in range(3_000))), 413, "bytes", path=CSV),
    Bad("CSV without ids", csv_post(b"userId\r\n\r\n"), 400, "no recipient ids", path=CSV),
    Bad(
        "CSV without file",
        {"data": {"content": "hi"}, "files": {"other": ("a", b"u1")}, "headers": ADMIN},
        400,
        "`file`",
        path=CSV,
    ),
    Bad("CSV as JSON", json_post({"content": "hi"}), 415, "multipart", path=CSV),
    Bad("CSV with empty content", csv_post(b"u1\n", content=" "), 400, "content must not be empty", path=CSV),
    Bad("CSV with targetType ALL", csv_post(b"u1\n", targetType="ALL"), 400, "must be SELECTED", path=CSV),
    Bad("CSV with targetType ROLE", csv_post(b"u1\n", targetType="ROLE"), 400, "must be SELECTED", path=CSV),
    Bad("CSV with targetIds", csv_post(b"u1\n", targetIds="u2"), 400, "targetIds", path=CSV),
    Bad("CSV with fireAndForget yes", csv_post(b"u1\n", fireAndForget="yes"), 400, "fireAndForget", path=CSV),
    Bad("CSV with past expiresAt", csv_post(b"u1\n", expiresAt=at(hours=-1)), 400, "past", path=CSV),
    Bad("CSV without a bearer token", csv_upload(b"u1\n"), 401, "bearer token", path=CSV),
    Bad(
        "user with a bad role", json_post({"roles": ["a b"]}), 400, "roles.0", path="/api/admin/users/u1", method="PUT"
    ),
    Bad("user id too long", json_post({}), 400, "user id", path="/api/admin/users/" + "u" * 129, method="PUT"),
    Bad("user unknown field", json_post({"role": "x"}), 400, "role", path="/api/admin/users/u1", method="PUT"),
    Bad(
        "bulk over max_bulk_users",
        json_post([{"id": f"u{i}"} for i in range(MAX_BULK_USERS + 1)]),
        400,
        f"at most {MAX_BULK_USERS}",
        path="/api/admin/users/bulk",
    ),
    Bad(
        "bulk with one bad entry",
        json_post([{"id": "u1"}, {"id": "u2", "roles": ["no spaces please"]}]),
        400,
        "1.roles.0",
        path="/api/admin/users/bulk",
    ),
    Bad("bulk with an empty id", json_post([{"id": "u1"}, {"id": ""}]), 400, "[1].id", path="/api/admin/users/bulk"),
]


@pytest.mark.parametrize("bad", BAD_INPUT, ids=str)
async def test_refused_input_is_a_precise_problem_and_writes_nothing(api: Api, bad: Bad) -> None:
    before = await api.rows()
    response = await api.http.request(bad.method, bad.path, **bad.request)
    problem = assert_problem(response, bad.status)
    assert bad.needle in response.text, problem
    assert await api.rows() == before
    if bad.status == 401:
        assert response.headers["www-authenticate"] == 'Bearer realm="broadcast"'


async def test_field_errors_are_listed(api: Api) -> None:
    response = await api.http.post(
        BROADCASTS, json={"content": 1, "targetType": "X", "extra": "y" * 10_000}, headers=ADMIN
    )
    problem = assert_problem(response, 400)
    assert {e["field"] for e in problem["errors"]} == {"content", "targetType", "extra"}
    assert "y" * 100 not in response.text  # the input is not echoed back


# --------------------------------------------------------------------------- mass assignment (RELIABILITY #33)
# Fields a client might try to set that the server owns (or that do not exist): each is an unknown field.
SERVER_OWNED: dict[str, Any] = {
    "id": "00000000-0000-4000-8000-000000000001",
    "status": "DELIVERED",
    "tenant_id": "tenant-1",
    "tenantId": "tenant-1",
    "role": "admin",
    "roles": ["admin"],
    "createdAt": "2020-01-01T00:00:00Z",
    "senderId": "mallory",
    "created_by": "mallory",
    "targetedCount": 1_000_000,
}


async def test_server_owned_fields_in_a_create_body_are_refused_by_name_and_write_nothing(api: Api) -> None:
    """400 naming the field (the API's one status for a body that does not match its schema, as for a wrong
    type; see README "Input rules"), nothing written; the sender, id, status and times come from the server."""
    valid = {"content": "hi", "targetType": "SELECTED", "targetIds": ["u1"]}
    before = await api.rows()
    for field, value in SERVER_OWNED.items():
        response = await api.http.post(BROADCASTS, json={**valid, field: value}, headers=ADMIN)
        problem = assert_problem(response, 400)
        assert problem["errors"] == [{"field": field, "message": "Extra inputs are not permitted"}], field
    every = assert_problem(await api.http.post(BROADCASTS, json={**valid, **SERVER_OWNED}, headers=ADMIN), 400)
    assert sorted(e["field"] for e in every["errors"]) == sorted(SERVER_OWNED)
    assert await api.rows() == before, "a refused request wrote something"
    created = await api.create(valid)  # the same body without them is fine, and the server fills them in
    assert created["senderId"] == "admin-ann" and created["status"] == "ACTIVE" and created["targetedCount"] == 1
    assert created["id"] != SERVER_OWNED["id"] and created["createdAt"] != SERVER_OWNED["createdAt"]


# Names that would reveal storage internals (outbox rows, lanes, row ids, tenancy, secrets) in an answer.
INTERNAL_NAME = re.compile(r"(?i)outbox|lane|row_?id|tenant|internal|secret|password|token")


def _schema(document: dict[str, Any], schema: dict[str, Any]) -> dict[str, Any]:
    """``schema`` with a top-level ``$ref`` resolved against the document."""
    while "$ref" in schema:
        schema = document["components"]["schemas"][schema["$ref"].rsplit("/", 1)[-1]]
    return schema


def _response_schema(document: dict[str, Any], path: str, method: str, status: int) -> dict[str, Any]:
    answer = document["paths"][path][method]["responses"][str(status)]
    return _schema(document, answer["content"]["application/json"]["schema"])


def _assert_documented(document: dict[str, Any], schema: dict[str, Any], body: Any, where: str) -> None:
    """Every key of ``body`` is a property ``schema`` documents (recursively into objects and arrays), every
    required property is there, and no key names an internal."""
    schema = _schema(document, schema)
    if isinstance(body, dict):
        properties = schema["properties"]
        assert set(body) <= set(properties), f"{where}: undocumented {sorted(set(body) - set(properties))}"
        assert set(schema.get("required", ())) <= set(body), f"{where}: missing {schema.get('required')}"
        assert not [k for k in body if INTERNAL_NAME.search(k)], f"{where}: internal field in {sorted(body)}"
        for key, value in body.items():
            _assert_documented(document, properties[key], value, f"{where}.{key}")
    elif isinstance(body, list) and "items" in schema:
        for i, item in enumerate(body):
            _assert_documented(document, schema["items"], item, f"{where}[{i}]")


async def test_answers_carry_only_what_their_openapi_schema_documents(api: Api) -> None:
    document = (await api.http.get("/api/openapi.json")).json()
    assert (await api.http.put("/api/admin/users/u1", json={"roles": ["ops"]}, headers=ADMIN)).status_code == 200
    answers: list[tuple[str, str, int, httpx.Response]] = []
    for body in (
        {"content": "to u1", "targetType": "SELECTED", "targetIds": ["u1"], "category": "c"},
        {"content": "to ops", "targetType": "ROLE", "targetIds": ["ops"], "expiresAt": at(hours=1)},
        {"content": "to all", "targetType": "ALL", "scheduledAt": at(seconds=-1)},
    ):
        created = await api.http.post(BROADCASTS, json=body, headers=ADMIN)
        answers.append((BROADCASTS, "post", 201, created))
        got = await api.http.get(f"{BROADCASTS}/{created.json()['id']}", headers=ADMIN)
        answers.append((BROADCASTS + "/{id}", "get", 200, got))
    answers.append((BROADCASTS, "get", 200, await api.http.get(BROADCASTS, headers=ADMIN)))
    answers.append((BROADCASTS, "get", 200, await api.http.get(BROADCASTS, params={"limit": 1}, headers=ADMIN)))
    inbox = await api.http.get("/api/user/messages", headers=bearer("u1"))
    assert [m["content"] for m in inbox.json()["items"]] == ["to all", "to ops", "to u1"]
    answers.append(("/api/user/messages", "get", 200, inbox))
    answers.append(
        ("/api/user/messages/unread", "get", 200, await api.http.get("/api/user/messages/unread", headers=bearer("u1")))
    )
    for path, method, status, response in answers:
        assert response.status_code == status, response.text
        _assert_documented(document, _response_schema(document, path, method, status), response.json(), path)


async def test_csv_line_errors_name_their_lines(api: Api) -> None:
    data = b"userId\nalice\nbob,carol\n\n" + b"x" * 200 + b"\nok\n\xff\xfe\n"
    problem = assert_problem(await api.http.post(CSV, **csv_post(data)), 400)
    assert problem["invalidLines"] == 3
    assert problem["errors"] == [
        {"line": 3, "error": "more than one column: only the user id is expected"},
        {"line": 5, "error": "user id longer than 128 characters"},
        {"line": 7, "error": "not valid UTF-8"},
    ]


class Counting:
    """A request body of ``head`` then ``chunks`` equal chunks, recording how many chunks the server pulled."""

    def __init__(self, head: bytes, chunk: bytes, chunks: int) -> None:
        self.head, self.chunk, self.chunks, self.pulled = head, chunk, chunks, 0

    def __len__(self) -> int:
        return len(self.head) + len(self.chunk) * self.chunks

    async def __aiter__(self) -> AsyncIterator[bytes]:
        yield self.head
        for _ in range(self.chunks):
            self.pulled += 1
            yield self.chunk


def twenty_megabytes() -> Counting:
    """A JSON create request with ~2M targetIds (``"u0000001",`` each) in ~64 KiB chunks."""
    ids = b"".join(b'"u%07d",' % i for i in range(6_500))
    head = b'{"content": "hi", "targetType": "SELECTED", "targetIds": ['
    return Counting(head, ids, 2_000_000 // 6_500 + 1)


@pytest.mark.parametrize("declared", [True, False], ids=["content-length", "chunked"])
async def test_a_20_mb_body_is_refused_without_reading_it(api: Api, declared: bool) -> None:
    body = twenty_megabytes()
    total = len(body)
    assert total > 20_000_000
    headers = {**ADMIN, "Content-Type": "application/json"}
    if declared:
        headers["Content-Length"] = str(total)
    before = await api.rows()
    response = await api.http.post(BROADCASTS, content=body, headers=headers)
    assert_problem(response, 413)
    assert body.pulled <= (1_048_576 // len(body.chunk)) + 2  # at most the limit's worth was read
    if declared:
        assert body.pulled <= 1
    assert await api.rows() == before


async def test_a_chunked_csv_over_the_limit_is_refused_while_it_arrives(api: Api) -> None:
    boundary = "b0undary"
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="content"\r\n\r\nhi\r\n'
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="r.csv"\r\n\r\n'
    ).encode()
    body = Counting(head, b"u1\n" * 20_000, 200)  # 60 KB chunks, 12 MB in all, no Content-Length
    headers = {**ADMIN, "Content-Type": f"multipart/form-data; boundary={boundary}"}
    response = await api.http.post(CSV, content=body, headers=headers)
    assert_problem(response, 413)
    assert body.pulled < 40  # the limit (256 KiB + 1 MiB of form fields) is about 22 chunks
    assert (await api.rows())["broadcast_messages"] == 0
