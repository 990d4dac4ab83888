"""``server.lane_classes``: which priority class a process's relay loops and delivery listeners work."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import pytest
from pydantic import SecretStr, ValidationError

from broadcast.core.settings import DatabaseSettings, KafkaSettings, ServerSettings, Settings
from broadcast.runtime.app import create_app

NORMAL = {"outbox-relay", "delivery-selected"}
PRIORITY = {"outbox-relay-priority", "delivery-group", "delivery-selected-priority"}


@pytest.mark.parametrize(
    ("classes", "running", "absent"),
    [("both", NORMAL | PRIORITY, set()), ("normal", NORMAL, PRIORITY), ("priority", PRIORITY, NORMAL)],
)
async def test_a_process_runs_the_loops_and_listeners_of_its_lane_classes_only(
    tmp_path: Path, classes: str, running: set[str], absent: set[str]
) -> None:
    """The wiring, on the embedded components (``normal``/``priority`` are refused there, see below, so the
    setting is put in after validation: the roles are started the same way on Kafka)."""
    settings = Settings(database=DatabaseSettings(url=SecretStr(f"sqlite+aiosqlite:///{tmp_path}/app.db")))
    settings = settings.model_copy(update={"server": settings.server.model_copy(update={"lane_classes": classes})})
    app = create_app(settings)
    transport = httpx.ASGITransport(app=app)
    async with app.router.lifespan_context(app), httpx.AsyncClient(transport=transport, base_url="http://t") as http:
        assert (await http.get("/health/ready")).status_code == 200
        names = {t.get_name() for t in asyncio.all_tasks()}
    assert running <= names, f"missing: {running - names}"
    assert not absent & names, f"should not run here: {absent & names}"


@pytest.mark.parametrize("classes", ["normal", "priority"])
def test_one_class_only_is_refused_on_the_embedded_event_log_where_no_other_process_could_work_the_rest(
    classes: str,
) -> None:
    with pytest.raises(ValidationError, match="lane_classes"):
        Settings(server=ServerSettings(lane_classes=classes))
    assert Settings(server=ServerSettings(lane_classes=classes), kafka=KafkaSettings(bootstrap_servers="k:9092"))
