"""The listener container: runs a ``Listener``'s group members, calls its handler, commits explicit offsets.

Spring Kafka's ``ConcurrentMessageListenerContainer``, small: ``concurrency`` members, each one
``EventLog.subscribe`` subscription driven by its own task, all in one task group. Invariants:

- An offset is committed only once every record before it in the partition was handled, or given up by
  the error handler (``RECOVERED``). ``RECORD`` and ``BATCH`` modes commit behind the fetches: one commit
  in flight at a time, started once a fetch's records are handled, while the next fetch goes on; a rebalance
  and a stop wait for it before they commit. ``MANUAL_IMMEDIATE`` commits when the handler awaits
  ``ack.acknowledge()``.
- A failing record is retried by seeking back to it (``Retry``): nothing after it in its partition is
  handled first, so per-key order holds. A retry with a backoff pauses that partition until it is due;
  the member keeps fetching (its other partitions), so it never exceeds ``max_poll_interval_ms``.
- Rebalance: ``on_revoked`` waits (at most ``finish_timeout_s``) for the record in hand, commits the
  processed offsets and forgets the revoked partitions; the rest of a batch fetched before a rebalance is
  dropped (its records come again from the committed offsets, to whichever member owns them now).
- A commit that fails (``CommitFailedError``, or no answer within ``commit_timeout_s``) is logged and
  the container carries on: the records are delivered again, which is safe because processing is
  idempotent. Delivery is at-least-once.
- Stop (the ``stop`` event, or leaving the ``async with``): each member finishes the record in hand, commits,
  and closes its subscription. A handler still running after ``finish_timeout_s`` is cancelled and its
  record not committed, so shutdown never waits on a handler for longer than that.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING

from broadcast.core import constants
from broadcast.core.ports.log import EventLog, EventRecord, EventSubscription, TopicPartition
from broadcast.errors import UnavailableError
from broadcast.observability import logs
from broadcast.observability.loops import pause
from broadcast.observability.metrics import NO_METRICS, Metrics
from consumers.errors import BatchListenerFailedError, Decision, DefaultErrorHandler, ErrorHandler, Retry
from consumers.listener import AckMode, Listener

if TYPE_CHECKING:
    from prometheus_client import Counter

log = logging.getLogger(__name__)
ERROR_BACKOFF_S = 1.0


class ListenerContainer:
    """Runs one listener: ``await run(stop)``, or ``async with ListenerContainer(...):`` (stops on exit)."""

    def __init__(
        self,
        event_log: EventLog,
        listener: Listener,
        error_handler: ErrorHandler | None = None,
        *,
        commit_timeout_s: float = 10.0,
        finish_timeout_s: float = 10.0,
        metrics: Metrics = NO_METRICS,
        rebalance_log_level: int = logging.INFO,
    ) -> None:
        self.event_log = event_log
        # assignments and revocations: INFO on Kafka (an operator follows rebalances), DEBUG where nothing
        # rebalances (the embedded log's one member takes every partition at start)
        self.rebalance_log_level = rebalance_log_level
        self.listener = listener
        self.error_handler: ErrorHandler = error_handler or DefaultErrorHandler()
        self.commit_timeout_s = commit_timeout_s
        self.finish_timeout_s = finish_timeout_s
        self.metrics = metrics
        self._consumed: dict[str, Counter] = {}
        self._members = [_Member(self, index) for index in range(listener.concurrency)]
        self._running = False
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    # -- observation (tests, metrics, health)
    def assignments(self) -> list[frozenset[TopicPartition]]:
        """Each running member's current partitions."""
        return [m.assignment() for m in self._members]

    @property
    def handled(self) -> int:
        """Records whose handler returned normally (retried deliveries count each time)."""
        return sum(m.handled for m in self._members)

    @property
    def commit_failures(self) -> int:
        return sum(m.commit_failures for m in self._members)

    def consumed(self, topic: str) -> Counter:
        """``records_consumed{topic}``, its child looked up once per topic (not once per record)."""
        child = self._consumed.get(topic)
        if child is None:
            child = self._consumed[topic] = self.metrics.records_consumed.labels(topic)
        return child

    @property
    def running(self) -> bool:
        return self._running

    def stalled(self, stall_s: float) -> str | None:
        """Why this container is not making progress, or None: not running, a member not in its group,
        fetching failing, a record in hand or retried for longer than ``stall_s``."""
        if not self._running:
            return "not running"
        problems = [p for m in self._members if (p := m.stalled(stall_s)) is not None]
        return "; ".join(problems) or None

    # -- running
    async def run(self, stop: asyncio.Event) -> None:
        """Run the members until ``stop`` is set; returns once every subscription is closed. One run at a time."""
        if self._running:
            raise RuntimeError(f"listener container {self.listener.name!r} is already running")
        self._running = True
        try:
            async with asyncio.TaskGroup() as group:
                for member in self._members:
                    group.create_task(member.run(stop), name=f"listener-{self.listener.name}-{member.index}")
        except BaseExceptionGroup as failures:  # one failing member stops the others; surface its error
            if len(failures.exceptions) == 1:
                raise failures.exceptions[0] from None
            raise
        finally:
            self._running = False

    async def __aenter__(self) -> ListenerContainer:
        self._stop = asyncio.Event()
        self._task = asyncio.create_task(self.run(self._stop), name=f"listener-{self.listener.name}")
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self._stop.set()
        if self._task is not None:
            task, self._task = self._task, None
            await task


class HandlerEscapeError(RuntimeError):
    """A handler raised a ``BaseException`` that is not the container's to propagate (a ``CancelledError`` of
    its own making, say): the record failed, like any other error, instead of ending the listener."""

    def __init__(self, escaped: BaseException) -> None:
        super().__init__(f"handler raised {type(escaped).__name__}: {escaped}")
        self.__cause__ = escaped


def _ours_to_raise(exc: BaseException) -> bool:
    """Process exits, and a cancellation of this task (stop, shutdown), end the listener; nothing else does."""
    if isinstance(exc, KeyboardInterrupt | SystemExit):
        return True
    task = asyncio.current_task()
    return isinstance(exc, asyncio.CancelledError) and task is not None and task.cancelling() > 0


def _correlation_id(record: EventRecord) -> str | None:
    for key, value in record.headers:
        if key == constants.HEADER_CORRELATION_ID:
            return value.decode("utf-8", errors="replace")[:200]
    return None


class _Acknowledgment:
    """The ``Acknowledgment`` of one record: commits the offset after it, now."""

    __slots__ = ("_member", "_offset", "_partition")

    def __init__(self, member: _Member, partition: TopicPartition, offset: int) -> None:
        self._member, self._partition, self._offset = member, partition, offset

    async def acknowledge(self) -> None:
        await self._member.commit({self._partition: self._offset + 1})


class _Member:
    """One group member: its subscription, its handled-but-uncommitted offsets, its rebalance callbacks.

    ``_pending[tp]`` is the offset after the last handled record of ``tp`` not yet committed; it only
    moves over handled (or skipped) records, in order. ``_generation`` changes at every rebalance callback,
    so a batch fetched under an older assignment is abandoned.
    """

    def __init__(self, container: ListenerContainer, index: int) -> None:
        self.container = container
        self.listener = container.listener
        self.index = index
        self.handled = 0
        self.commit_failures = 0
        self._started = time.monotonic()
        self._joined = False
        self._in_hand_since: float | None = None
        self._stuck_since: float | None = None  # fetch failing, or a record being retried, since
        self._sub: EventSubscription | None = None
        self._pending: dict[TopicPartition, int] = {}
        self._failures: dict[TopicPartition, tuple[int, int]] = {}  # partition -> (offset, attempts)
        self._paused: dict[TopicPartition, float] = {}  # partition -> monotonic time its retry is due
        self._generation = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._committing: asyncio.Task[None] | None = None  # a commit of handled offsets, behind the fetches

    def assignment(self) -> frozenset[TopicPartition]:
        return self._sub.assignment() if self._sub is not None else frozenset()

    def stalled(self, stall_s: float) -> str | None:
        now, name = time.monotonic(), f"{self.listener.name}[{self.index}]"
        if not self._joined and now - self._started > stall_s:
            return f"{name} has not joined group {self.listener.group_id} after {now - self._started:.0f} s"
        if self._in_hand_since is not None and now - self._in_hand_since > stall_s:
            return f"{name} has been handling one record (or batch) for {now - self._in_hand_since:.0f} s"
        if self._stuck_since is not None and now - self._stuck_since > stall_s:
            return f"{name} has made no progress for {now - self._stuck_since:.0f} s (fetch failing or record retried)"
        return None

    async def run(self, stop: asyncio.Event) -> None:
        listener = self.listener
        self._started = time.monotonic()
        async with self.container.event_log.subscribe(
            listener.topics, listener.group_id, on_revoked=self._on_revoked, on_assigned=self._on_assigned
        ) as sub:
            self._sub = sub
            try:
                await self._consume_until_stopped(stop)
            finally:
                await self._commit_settled()
                await self._commit_pending()
                self._sub = None

    async def _consume_until_stopped(self, stop: asyncio.Event) -> None:
        """Consume until ``stop``; then give the record in hand ``finish_timeout_s`` before cancelling it."""
        work = asyncio.create_task(self._consume(stop))
        stopped = asyncio.create_task(stop.wait())
        try:
            await asyncio.wait({work, stopped}, return_when=asyncio.FIRST_COMPLETED)
            if not work.done():
                await asyncio.wait({work}, timeout=self.container.finish_timeout_s)
                if not work.done():
                    log.warning(
                        "listener %s: a handler did not finish within %.1f s of stop; cancelled, not committed",
                        self.listener.name,
                        self.container.finish_timeout_s,
                    )
        finally:
            stopped.cancel()
            work.cancel()
            await asyncio.wait({work})
        if not work.cancelled() and (failure := work.exception()) is not None:
            raise failure

    async def _consume(self, stop: asyncio.Event) -> None:
        assert self._sub is not None
        while not stop.is_set():
            try:
                records = await self._sub.fetch(self.listener.max_poll_records, self._resume_due())
            except UnavailableError as exc:
                log.warning("listener %s: fetch failed, retrying: %s", self.listener.name, exc)
                self._stuck_since = self._stuck_since or time.monotonic()
                await pause(stop, ERROR_BACKOFF_S)
                continue
            if not self._failures:
                self._stuck_since = None
            if records:
                if self.listener.batch_handler is not None:
                    await self._process_batches(records, stop)
                else:
                    await self._process(records, stop)
            self._commit_behind()

    async def _process(self, records: list[EventRecord], stop: asyncio.Event) -> None:
        generation = self._generation
        rewound: set[TopicPartition] = set()
        for record in records:
            if stop.is_set() or generation != self._generation:
                return
            tp = TopicPartition(record.topic, record.partition)
            if tp not in rewound and not await self._handle(record, tp, generation):
                rewound.add(tp)

    async def _handle(self, record: EventRecord, tp: TopicPartition, generation: int) -> bool:
        """Handle one record; False when it is to be retried (the partition was sought back to it)."""
        manual = self.listener.ack_mode is AckMode.MANUAL_IMMEDIATE
        self._idle.clear()
        self._in_hand_since = time.monotonic()
        try:
            with logs.bound(correlation=_correlation_id(record)):  # the handler's and error handler's lines
                try:
                    if self.listener.acknowledging_handler is not None:
                        await self.listener.acknowledging_handler(record, _Acknowledgment(self, tp, record.offset))
                    elif self.listener.handler is not None:
                        await self.listener.handler(record)
                    decision = None
                except Exception as exc:
                    decision = await self._recover(record, tp, exc)
                except BaseException as exc:
                    if _ours_to_raise(exc):
                        raise
                    log.error(
                        "listener %s: the handler raised %r; handled as a failure of the record",
                        self.listener.name,
                        exc,
                    )
                    decision = await self._recover(record, tp, HandlerEscapeError(exc))
            if decision is not None:
                if isinstance(decision, Retry):
                    self._stuck_since = self._stuck_since or time.monotonic()
                    self._rewind(tp, record.offset, generation, decision.after_s)
                    return False
                if manual:  # recovered: commit past it, as Spring does after a recoverer
                    await self.commit({tp: record.offset + 1})
            self._done(tp, record, 1, handled=decision is None, pending=not manual)
            return True
        finally:
            self._in_hand_since = None
            self._idle.set()

    async def _process_batches(self, records: list[EventRecord], stop: asyncio.Event) -> None:
        """A batch listener's fetch: each partition's records go to the handler as one batch, the partitions
        concurrently (order holds within each); the fetch counts as in hand until every batch is done."""
        generation = self._generation
        batches: dict[TopicPartition, list[EventRecord]] = {}
        for record in records:
            batches.setdefault(TopicPartition(record.topic, record.partition), []).append(record)
        self._idle.clear()
        self._in_hand_since = time.monotonic()
        try:
            async with asyncio.TaskGroup() as group:
                for tp, batch in batches.items():
                    group.create_task(self._handle_batch(tp, batch, generation, stop))
        except BaseExceptionGroup as failures:  # only what ends the listener gets here (``_ours_to_raise``)
            raise failures.exceptions[0] from None
        finally:
            self._in_hand_since = None
            self._idle.set()

    async def _handle_batch(
        self, tp: TopicPartition, batch: list[EventRecord], generation: int, stop: asyncio.Event
    ) -> None:
        """Hand ``batch`` (one partition's records, in order) to the batch handler until all of it is handled
        or recovered, or a record is to be retried (the partition is sought back to it, as for a record
        listener). ``BatchListenerFailedError(i)``: the records before ``i`` are handled, record ``i`` goes to
        the error handler with the exception's cause; once recovered, the rest goes to the handler again."""
        assert self.listener.batch_handler is not None
        rest = batch
        while rest and not stop.is_set() and generation == self._generation:
            try:
                await self.listener.batch_handler(rest)
            except BatchListenerFailedError as exc:
                index = exc.index if 0 <= exc.index < len(rest) else 0
                cause = exc.__cause__ if isinstance(exc.__cause__, Exception) else exc
            except Exception as exc:
                index, cause = 0, exc
            except BaseException as exc:
                if _ours_to_raise(exc):
                    raise
                log.error(
                    "listener %s: the batch handler raised %r; a failure of its first record", self.listener.name, exc
                )
                index, cause = 0, HandlerEscapeError(exc)
            else:
                self._done(tp, rest[-1], len(rest), handled=True)
                return
            if index:
                self._done(tp, rest[index - 1], index, handled=True)
            failed = rest[index]
            with logs.bound(correlation=_correlation_id(failed)):
                decision = await self._recover(failed, tp, cause)
            if isinstance(decision, Retry):
                self._stuck_since = self._stuck_since or time.monotonic()
                self._rewind(tp, failed.offset, generation, decision.after_s)
                return
            self._done(tp, failed, 1, handled=False)
            rest = rest[index + 1 :]

    def _done(self, tp: TopicPartition, last: EventRecord, count: int, *, handled: bool, pending: bool = True) -> None:
        """``count`` consecutive records of ``tp``, up to ``last``, are done: handled, or (``handled`` False)
        recovered by the error handler. ``pending``: their offsets wait for the next commit (not in
        ``MANUAL_IMMEDIATE``, where the handler commits). Record and batch listeners alike."""
        if handled:
            self.handled += count
        self.container.consumed(last.topic).inc(count)
        if pending:
            self._pending[tp] = last.offset + 1
        self._failures.pop(tp, None)
        if not self._failures:
            self._stuck_since = None

    async def _recover(self, record: EventRecord, tp: TopicPartition, exc: Exception) -> Decision:
        offset, attempts = self._failures.get(tp, (record.offset, 0))
        attempt = attempts + 1 if offset == record.offset else 1
        self._failures[tp] = (record.offset, attempt)
        try:
            return await self.container.error_handler.handle(record, exc, attempt)
        except Exception:
            log.exception("listener %s: the error handler failed; retrying the record", self.listener.name)
            return Retry(ERROR_BACKOFF_S)

    def _rewind(self, tp: TopicPartition, offset: int, generation: int, after_s: float) -> None:
        """Seek back to a record to retry (pausing its partition for ``after_s``); after a rebalance the
        position already restarts at the commit."""
        if self._sub is not None and generation == self._generation and tp in self._sub.assignment():
            self._sub.seek(tp, offset)
            if after_s > 0:
                self._sub.pause([tp])
                self._paused[tp] = time.monotonic() + after_s

    def _resume_due(self) -> float:
        """Resume the paused partitions whose retry is due; the fetch timeout that wakes for the next one."""
        timeout = self.listener.poll_timeout_s
        if not self._paused or self._sub is None:
            return timeout
        now = time.monotonic()
        due = [tp for tp, at in self._paused.items() if at <= now]
        if due:
            self._sub.resume(due)
            for tp in due:
                del self._paused[tp]
        if self._paused:
            timeout = min(timeout, max(min(self._paused.values()) - now, 0.001))
        return timeout

    async def commit(self, offsets: Mapping[TopicPartition, int]) -> bool:
        """Commit explicit offsets; a failure is logged and reported as False, never raised."""
        if not offsets or self._sub is None:
            return True
        try:
            async with asyncio.timeout(self.container.commit_timeout_s):
                await self._sub.commit(offsets)
        except (UnavailableError, TimeoutError) as exc:  # CommitFailedError is an UnavailableError
            self.commit_failures += 1
            log.warning(
                "listener %s: commit of %s failed; those records will be delivered again: %r",
                self.listener.name,
                dict(offsets),
                exc,
            )
            return False
        return True

    def _commit_behind(self) -> None:
        """Commit the handled offsets while the next fetch goes on (Spring's ``syncCommits=false``): one commit
        in flight at a time, offsets handled meanwhile go with the next one. Measured at 1,000 msg/s on this
        box: a commit took ~30 ms of a ~100 ms fetch-handle-commit cycle, and every record fetched waited for it.
        A crash loses at most the commits in flight: those records come again (processing is idempotent)."""
        if self._pending and (self._committing is None or self._committing.done()):
            self._committing = asyncio.create_task(self._commit_pending())

    async def _commit_settled(self) -> None:
        """Wait for the commit in flight, so that a later commit never races an earlier one."""
        if self._committing is not None:
            await asyncio.wait({self._committing})
            if not self._committing.cancelled() and (failure := self._committing.exception()) is not None:
                log.warning("listener %s: a background commit failed: %r", self.listener.name, failure)
            self._committing = None

    async def _commit_pending(self, only: frozenset[TopicPartition] | None = None) -> None:
        """Commit handled offsets; a partition this member no longer holds is forgotten, not committed.

        One foreign partition would make the whole commit fail; its records go to the new owner anyway.
        """
        if self._sub is None or not self._pending:
            return
        held = self._sub.assignment()
        for tp in set(self._pending) - held:
            del self._pending[tp]
        offsets = {tp: o for tp, o in self._pending.items() if only is None or tp in only}
        if await self.commit(offsets):
            for tp, offset in offsets.items():
                if self._pending.get(tp) == offset:
                    del self._pending[tp]

    # -- rebalance callbacks (run in the task that drives the rebalance)
    async def _on_revoked(self, partitions: frozenset[TopicPartition]) -> None:
        self._generation += 1
        self._joined, self._started = False, time.monotonic()  # rejoining: the clock of ``stalled`` restarts
        if not self._idle.is_set():
            try:
                async with asyncio.timeout(self.container.finish_timeout_s):
                    await self._idle.wait()
            except TimeoutError:
                log.warning("listener %s: record still in hand at revocation; not committed", self.listener.name)
        await self._commit_settled()
        await self._commit_pending(partitions)
        for tp in partitions:
            self._pending.pop(tp, None)
            self._failures.pop(tp, None)
            self._paused.pop(tp, None)  # a reassigned partition starts unpaused, at its committed offset
        if partitions:
            self._log_rebalance("revoked", partitions)

    async def _on_assigned(self, partitions: frozenset[TopicPartition]) -> None:
        self._generation += 1
        self._joined = True  # called after every successful join, even with no partitions
        for tp in set(self._pending) - partitions:
            del self._pending[tp]
        for tp in set(self._failures) - partitions:
            del self._failures[tp]
        self._log_rebalance("assigned", partitions)

    def _log_rebalance(self, what: str, partitions: frozenset[TopicPartition]) -> None:
        level = self.container.rebalance_log_level
        if log.isEnabledFor(level):
            log.log(level, "listener %s member %d: %s %s", self.listener.name, self.index, what, _spans(partitions))


def _spans(partitions: Iterable[TopicPartition]) -> str:
    """``topic[0-3,7]`` per topic: partitions as ranges, short enough for one log line."""
    by_topic: dict[str, list[int]] = {}
    for tp in partitions:
        by_topic.setdefault(tp.topic, []).append(tp.partition)
    described = []
    for topic, numbers in sorted(by_topic.items()):
        runs: list[list[int]] = []
        for number in sorted(numbers):
            if runs and number == runs[-1][-1] + 1:
                runs[-1].append(number)
            else:
                runs.append([number])
        described.append(f"{topic}[{','.join(str(r[0]) if len(r) == 1 else f'{r[0]}-{r[-1]}' for r in runs)}]")
    return " ".join(described) or "no partitions"
