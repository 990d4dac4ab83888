"""Load-generator worker processes, driven by the parent over a pipe each.

A worker process raises its descriptor limit, builds its ``Worker`` (an object whose public methods are
the commands; coroutines are awaited) and answers each ``(command, args)`` with the method's result, on
uvloop when it is installed. ``close`` ends it. ``WorkerPool`` is the parent's handle on the processes.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import multiprocessing
import resource
from multiprocessing.connection import Connection
from typing import Any


async def _serve(pipe: Connection, worker: Any) -> None:
    loop = asyncio.get_running_loop()
    while True:
        command, args = await loop.run_in_executor(None, pipe.recv)
        if command == "close":
            worker.close()
            await asyncio.sleep(0.2)
            pipe.send("closed")
            return
        result = getattr(worker, command)(*args)
        pipe.send(await result if inspect.isawaitable(result) else result)


def _worker_main(pipe: Connection, worker_type: type, setup: Any) -> None:
    """Process entry point: raise the fd limit, then obey the parent's commands until ``close``."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))

    async def main() -> None:
        await _serve(pipe, worker_type(setup))

    try:
        import uvloop

        uvloop.run(main())
    except ImportError:
        asyncio.run(main())


class WorkerPool:
    """``processes`` spawned workers of ``worker_type(setup)``; each command goes to every worker."""

    def __init__(self, worker_type: type, setup: Any, processes: int) -> None:
        ctx = multiprocessing.get_context("spawn")
        self._pipes: list[Connection] = []
        self._procs: list[Any] = []
        for _ in range(processes):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_worker_main, args=(child, worker_type, setup), daemon=True)
            proc.start()
            self._pipes.append(parent)
            self._procs.append(proc)

    @property
    def pids(self) -> list[int]:
        return [int(p.pid) for p in self._procs]

    @property
    def size(self) -> int:
        return len(self._pipes)

    def send(self, command: str, per_worker: list[tuple[Any, ...]]) -> None:
        """``command`` to every worker, each with its own arguments (answers: ``receive()``)."""
        for pipe, args in zip(self._pipes, per_worker, strict=True):
            pipe.send((command, args))

    def receive(self) -> list[Any]:
        return [pipe.recv() for pipe in self._pipes]

    def all(self, command: str, *args: Any) -> list[Any]:
        """The same command and arguments to every worker; their answers."""
        self.send(command, [args] * len(self._pipes))
        return self.receive()

    def close(self) -> None:
        with contextlib.suppress(OSError, EOFError):
            self.all("close")
        for proc in self._procs:
            proc.join(10)
            if proc.is_alive():
                proc.kill()
