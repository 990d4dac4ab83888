"""``broadcast-server``: the one console script (run, migrate, topics, stack)."""

from __future__ import annotations

import argparse
import asyncio
import importlib
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from pydantic import ValidationError as SettingsError

from broadcast.core import constants
from broadcast.core.settings import Settings
from broadcast.errors import BroadcastError
from broadcast.observability import logs
from broadcast.runtime.workers import ROLES


def _roles(value: str) -> frozenset[str]:
    roles = frozenset(r.strip() for r in value.split(",") if r.strip())
    unknown = roles - set(ROLES)
    if unknown or not roles:
        raise argparse.ArgumentTypeError(f"roles must be a comma-separated subset of {','.join(ROLES)}")
    return roles


def _load_settings(args: argparse.Namespace) -> Settings:
    settings = Settings()
    if getattr(args, "host", None):
        settings.server.host = args.host
    if getattr(args, "port", None) is not None:
        settings.server.port = args.port
    return settings


def cmd_run(args: argparse.Namespace) -> int:
    import uvicorn

    from broadcast.http.guard import guarded_protocol
    from broadcast.runtime.app import create_app
    from broadcast.runtime.serve import run
    from broadcast.runtime.shutdown import ShutdownClock

    settings = _load_settings(args)
    logs.configure(settings.observability.log_format, settings.server.log_level)
    logging.getLogger(__name__).info("roles: %s", ",".join(sorted(args.roles)))
    config = uvicorn.Config(
        create_app(settings, args.roles),
        host=settings.server.host,
        port=settings.server.port,
        log_config=None,  # our handler on the root logger (logs.configure) formats uvicorn's lines too
        log_level=settings.server.log_level,
        lifespan="on",
        timeout_graceful_shutdown=ShutdownClock(settings.server.shutdown_grace_seconds).http_drain_s(),
        backlog=settings.server.listen_backlog,
        http=guarded_protocol(
            settings.server.max_header_bytes,
            settings.server.header_timeout_seconds,
            settings.server.max_heads_in_flight,
        ),
    )
    started = run(config)
    return 0 if started else 1


def cmd_migrate(args: argparse.Namespace) -> int:
    from broadcast.adapters.sql import migrate as sql_migrate
    from broadcast.adapters.sql.engine import create_engine

    settings = _load_settings(args)

    async def migrate() -> str | None:
        engine = create_engine(settings.database)
        try:
            return await sql_migrate.upgrade(engine, settings.database)
        finally:
            await engine.dispose()

    revision = asyncio.run(migrate())
    print(f"database ({settings.database.dialect}) is at revision {revision}")
    return 0


def cmd_topics(args: argparse.Namespace) -> int:
    from broadcast.adapters.kafka.admin import ensure_topics

    settings = _load_settings(args)
    if settings.kafka.embedded:
        print("no Kafka configured (embedded default): the in-process log creates topics on use")
        return 0
    names = [settings.kafka.topic(t) for t in constants.ALL_TOPICS]
    reports = asyncio.run(ensure_topics(settings.kafka, names))
    for r in reports:
        state = "created" if r.created else "exists"
        verdict = "ok" if r.ok else "MISMATCH: " + "; ".join(r.problems)
        print(
            f"{r.name:45} {state:8} partitions={r.partitions} rf={r.replication_factor} "
            f"min.insync.replicas={r.min_insync_replicas}  {verdict}"
        )
    return 0 if all(r.ok for r in reports) else 1


def cmd_token(args: argparse.Namespace) -> int:
    from broadcast.auth.tokens import mint

    settings = _load_settings(args)
    if not settings.auth.dev_secret_in_use and not args.allow_configured_secret:
        print(
            "refusing to mint: the configured secret is not the development one "
            "(pass --allow-configured-secret to mint with it anyway)",
            file=sys.stderr,
        )
        return 2
    print(mint(settings.auth, args.sub, args.role, args.ttl))
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from broadcast.lifecycle import status

    settings = _load_settings(args)
    urls = args.url or [f"http://{settings.server.host}:{settings.server.port}"]
    token = settings.observability.metrics_token
    return status.run(urls, token.get_secret_value() if token else None)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="broadcast-server",
        description="Broadcast messaging server. Configure with BROADCAST_* variables; none set = embedded default.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="serve HTTP and run the selected roles")
    run.add_argument("--host", help="bind address (default from BROADCAST_SERVER__HOST, 127.0.0.1)")
    run.add_argument("--port", type=int, help="port (default from BROADCAST_SERVER__PORT, 8080)")
    run.add_argument(
        "--roles",
        type=_roles,
        default=frozenset(ROLES),
        help=f"comma-separated subset of {','.join(ROLES)} (default: all)",
    )
    run.set_defaults(func=cmd_run)

    migrate = sub.add_parser("migrate", help="apply database migrations (Alembic) to the configured database")
    migrate.set_defaults(func=cmd_migrate)

    topics = sub.add_parser("topics", help="create missing Kafka topics and verify existing ones")
    topics.set_defaults(func=cmd_topics)

    token = sub.add_parser("token", help="mint a bearer token (HS256, the configured secret) for development")
    token.add_argument("--sub", required=True, help="the user id (JWT sub)")
    token.add_argument("--role", action="append", default=[], help="a role (repeatable), e.g. --role admin")
    token.add_argument("--ttl", type=int, default=3_600, help="lifetime in seconds (default 3600)")
    token.add_argument(
        "--allow-configured-secret", action="store_true", help="mint with a non-development HS256 secret"
    )
    token.set_defaults(func=cmd_token)

    status = sub.add_parser("status", help="summarise running instances: readiness, lag, backlog, dead letters")
    status.add_argument(
        "--url",
        action="append",
        help="an instance's base URL (repeatable; default from BROADCAST_SERVER__HOST/PORT)",
    )
    status.set_defaults(func=cmd_status)

    sub.add_parser(
        "bench",
        add_help=False,
        help="run the benchmark suite (from a source checkout): bench [scenario ...] [--smoke] [--repeat R]",
    )

    from devstack.cli import register

    register(sub)
    return parser


def cmd_bench(argv: Sequence[str]) -> int:
    """``bench/`` is not installed with the package: it runs from the checkout this module lives in."""
    root = Path(__file__).resolve().parents[2]
    if not (root / "bench" / "suite.py").is_file():
        print("the benchmark suite runs from a source checkout (bench/ beside broadcast/)", file=sys.stderr)
        return 2
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    suite = importlib.import_module("bench.suite")
    code: int = suite.main(list(argv))
    return code


def main(argv: Sequence[str] | None = None) -> int:
    logs.configure()
    arguments = list(sys.argv[1:] if argv is None else argv)
    if arguments[:1] == ["bench"]:  # its own parser: every option after "bench" is the suite's
        return cmd_bench(arguments[1:])
    args = build_parser().parse_args(arguments)
    try:
        code: int = args.func(args)
    except SettingsError as exc:
        print(f"invalid settings: {exc}", file=sys.stderr)
        return 2
    except BroadcastError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return code


if __name__ == "__main__":
    sys.exit(main())
