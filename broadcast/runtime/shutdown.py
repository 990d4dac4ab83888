"""One shutdown budget, ``server.shutdown_grace_seconds`` from SIGTERM to exit, shared by its steps.

The HTTP drain (streams end after ``SERVER_SHUTDOWN``, requests in flight finish) gets
``HTTP_DRAIN_SHARE`` of it; the background loops get what is left of the grace period minus
``CLOSE_RESERVE_SHARE``, which is kept for closing the components (the producer's flush, the pools).
"""

from __future__ import annotations

import time

HTTP_DRAIN_SHARE = 0.4
CLOSE_RESERVE_SHARE = 0.2
MIN_LOOPS_S = 1.0


class ShutdownClock:
    """When shutdown began (the first SIGTERM/SIGINT), and how long the loops may still take."""

    def __init__(self, grace_s: float) -> None:
        self.grace_s = grace_s
        self.began: float | None = None

    def begin(self) -> None:
        if self.began is None:
            self.began = time.monotonic()

    def http_drain_s(self) -> int:
        return max(1, int(self.grace_s * HTTP_DRAIN_SHARE))

    def loops_budget_s(self) -> float:
        """Seconds the background loops get to stop, counted from the signal when there was one."""
        spent = 0.0 if self.began is None else time.monotonic() - self.began
        return max(MIN_LOOPS_S, self.grace_s * (1 - CLOSE_RESERVE_SHARE) - spent)
