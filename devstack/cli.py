"""The ``stack`` command (up, down, status, env) that the main CLI mounts via :func:`register`."""

from __future__ import annotations

import argparse
import sys
import time

from devstack import paths, stack, tools


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``stack`` command and its sub-commands; each sets ``func`` returning an exit code."""
    parser = subparsers.add_parser(
        "stack",
        help="manage the local Kafka/PostgreSQL/Redis stack for tests and development",
        description=(
            "Run a real 3-node Kafka KRaft cluster, PostgreSQL and Redis on 127.0.0.1. "
            f"State: $BROADCAST_STACK_DIR (now {paths.state_dir()}); jar cache: $BROADCAST_CACHE_DIR "
            f"(now {paths.cache_dir()})."
        ),
    )
    parser.set_defaults(func=lambda _args: _usage(parser))
    commands = parser.add_subparsers(dest="stack_command", metavar="{up,down,status,env,tools}")
    up = commands.add_parser("up", help="install what is missing, start everything, wait until ready")
    up.set_defaults(func=cmd_up)
    down = commands.add_parser("down", help="stop everything the stack started (idempotent)")
    down.set_defaults(func=cmd_down)
    status = commands.add_parser("status", help="show each part's pids, ports and readiness; exit 1 if any is down")
    status.set_defaults(func=cmd_status)
    env = commands.add_parser("env", help='print export lines; use: eval "$(broadcast-server stack env)"')
    env.set_defaults(func=cmd_env)
    tools_ = commands.add_parser("tools", help="install the programs the tests drive (promtool, chromium, kcat)")
    tools_.set_defaults(func=cmd_tools)


def _usage(parser: argparse.ArgumentParser) -> int:
    parser.print_help(sys.stderr)
    return 2


def cmd_up(_args: argparse.Namespace) -> int:
    """Bring the stack up and print how long each part took."""
    timings: dict[str, float] = {}
    try:
        stack.up(timings)
    except stack.StackError as exc:
        print(f"stack up failed: {exc}", file=sys.stderr)
        return 1
    for part, seconds in timings.items():
        print(f"{part:<14} {seconds:7.1f}s")
    print(f"stack is up (state in {paths.state_dir()})")
    return 0


def cmd_down(_args: argparse.Namespace) -> int:
    """Stop the stack."""
    started = time.monotonic()
    stack.down()
    print(f"stack is down ({time.monotonic() - started:.1f}s)")
    return 0


def cmd_tools(_args: argparse.Namespace) -> int:
    """Install the test suite's programs that are missing (Debian packages)."""
    try:
        installed = tools.install()
    except stack.StackError as exc:
        print(f"stack tools failed: {exc}", file=sys.stderr)
        return 1
    print(f"installed: {' '.join(installed)}" if installed else "test tools present: " + " ".join(tools.TOOLS))
    return 0


def cmd_status(_args: argparse.Namespace) -> int:
    """Print a table of the parts; non-zero exit if any is not running and ready."""
    rows = stack.status()
    print(f"{'component':<10} {'running':<8} {'ready':<6} {'pids':<10} ports")
    for name, row in rows.items():
        pids = ",".join(str(p) for p in row["pids"]) or "-"
        ports = ",".join(str(p) for p in row["ports"])
        running, ready = "yes" if row["running"] else "no", "yes" if row["ready"] else "no"
        print(f"{name:<10} {running:<8} {ready:<6} {pids:<10} {ports}")
    return 0 if all(row["running"] and row["ready"] for row in rows.values()) else 1


def cmd_env(_args: argparse.Namespace) -> int:
    """Print ``export NAME='value'`` lines pointing the server at the stack."""
    for name, value in stack.info().env().items():
        quoted = "'" + value.replace("'", "'\\''") + "'"
        print(f"export {name}={quoted}")
    return 0
