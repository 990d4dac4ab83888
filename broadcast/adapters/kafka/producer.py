"""The one idempotent producer, replaced when its idempotent session breaks.

aiokafka (0.14) does not recover an idempotent producer whose sequence numbers went out of step with a
partition's leader: after a leader failover a batch can fail with ``OutOfOrderSequenceNumber`` and every
later batch for that partition fails the same way until the process restarts (aio-libs/aiokafka#1017;
the Java client bumps its epoch instead, KIP-360). The fault suite saw it: the relay's rows for the
partition waited forever and every broadcast keyed to it was never published.

``ProducerSlot`` starts a new producer (a new producer id, sequences from 0) when a send fails with one of
these errors, and retires the broken one: its unacknowledged batches are failed, so their callers see a
``PublishError`` and the outbox publishes those rows again. A row may then be in the log twice; consumers
are idempotent (a delivery is keyed by its broadcast and user, a group message by its SSE id).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import TypeGuard

from aiokafka import AIOKafkaProducer
from aiokafka.errors import (
    InvalidProducerEpoch,
    KafkaError,
    OutOfOrderSequenceNumber,
    ProducerFenced,
    UnknownProducerId,
)

from broadcast.errors import UnavailableError

log = logging.getLogger(__name__)

#: errors after which this producer id can never write to the partition again
BROKEN_SESSION = (OutOfOrderSequenceNumber, UnknownProducerId, InvalidProducerEpoch, ProducerFenced)


def breaks_session(exc: BaseException | None) -> TypeGuard[BaseException]:
    return isinstance(exc, BROKEN_SESSION)


class ProducerSlot:
    """Holds the current producer; ``renew`` swaps in a fresh one (once, however many callers saw the error)."""

    def __init__(self, factory: Callable[[], AIOKafkaProducer], start_timeout_s: float, where: str) -> None:
        self._factory = factory
        self._start_timeout_s = start_timeout_s
        self._where = where
        self._producer: AIOKafkaProducer | None = None
        self._lock = asyncio.Lock()
        self._retiring: set[asyncio.Task[None]] = set()
        self.renewals = 0

    @property
    def current(self) -> AIOKafkaProducer | None:
        return self._producer

    async def start(self) -> None:
        self._producer = await self._started()

    async def _started(self) -> AIOKafkaProducer:
        producer = self._factory()
        try:
            await asyncio.wait_for(producer.start(), self._start_timeout_s)
        except (KafkaError, TimeoutError, OSError) as exc:
            await producer.stop()
            raise UnavailableError(f"cannot connect to Kafka at {self._where}: {exc!r}") from exc
        return producer

    async def renew(self, broken: AIOKafkaProducer, reason: BaseException) -> None:
        """Replace ``broken`` if it is still the current producer; if Kafka cannot be reached now, keep it
        (the next failed send tries again)."""
        async with self._lock:
            if self._producer is not broken:
                return  # another caller renewed it already
            log.warning("the Kafka producer's idempotent session broke (%r): starting a new producer", reason)
            try:
                fresh = await self._started()
            except UnavailableError as exc:
                log.warning("no new Kafka producer yet, the next failed send tries again: %s", exc)
                return
            self._producer = fresh
            self.renewals += 1
        task = asyncio.create_task(self._retire(broken, reason))
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    async def _retire(self, producer: AIOKafkaProducer, reason: BaseException) -> None:
        # fail what it still holds (its sender would retry those batches forever), then close it
        accumulator = getattr(producer, "_message_accumulator", None)
        if accumulator is not None:
            accumulator.fail_all(KafkaError(f"producer retired after {reason!r}"))
        try:
            async with asyncio.timeout(self._start_timeout_s):
                await producer.stop()
        except (KafkaError, TimeoutError, OSError) as exc:
            log.warning("the retired Kafka producer did not close cleanly: %r", exc)

    async def stop(self) -> None:
        if self._retiring:
            await asyncio.wait(set(self._retiring))
        if self._producer is not None:
            await self._producer.stop()
            self._producer = None
