"""PostgreSQL from Debian's packages, in a data dir of its own under the state dir, on 127.0.0.1:15432.

Runs as the ``postgres`` OS user when we are root (PostgreSQL refuses to run as root). Trust auth on
127.0.0.1 and the private unix socket only; database and role ``broadcast`` (password ``broadcast``).
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import subprocess
from pathlib import Path
from typing import Literal

from devstack import paths, proc

OS_USER = "postgres"
# Server settings for the write load the bench puts on it (a 1M-recipient CSV broadcast COPYs 2M rows in one
# transaction while URGENT messages commit beside it). PostgreSQL's defaults (1 GB of WAL between
# checkpoints, 128 MB of shared buffers, 4 MB of WAL buffers) checkpoint every ~12 s under that COPY, and
# every checkpoint makes the next write of each page log the whole page again: ~540 MB of WAL per
# checkpoint, which every commit then waits behind. Durability is untouched (fsync and synchronous_commit
# stay on). docker-compose.yml passes the same.
SERVER_SETTINGS = {
    "shared_buffers": "1GB",
    "wal_buffers": "64MB",
    "max_wal_size": "8GB",
    "min_wal_size": "1GB",
    "checkpoint_timeout": "15min",
    "checkpoint_completion_target": "0.9",
    "wal_compression": "lz4",
}


def bin_dir() -> Path:
    """The newest installed ``/usr/lib/postgresql/<version>/bin``, installing PostgreSQL if none is."""

    def find() -> Path | None:
        found = sorted(
            Path("/usr/lib/postgresql").glob("*/bin/initdb"),
            key=lambda p: int(re.sub(r"\D", "", p.parent.parent.name) or 0),
        )
        return found[-1].parent if found else None

    found = find()
    if found is None:
        proc.apt_install("postgresql")
        found = find()
    if found is None:
        raise proc.StackError("PostgreSQL is installed but no /usr/lib/postgresql/*/bin/initdb exists")
    return found


def data_dir() -> Path:
    return paths.postgres_dir() / "data"


def socket_dir() -> Path:
    """The private unix socket directory (keeps clear of a system cluster's /var/run/postgresql)."""
    return paths.postgres_dir() / "run"


def log_file() -> Path:
    return paths.postgres_dir() / "postgres.log"


def _user() -> str | None:
    return OS_USER if os.geteuid() == 0 else None


def _run(argv: list[str], check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run a PostgreSQL tool as the postgres OS user, from a directory that user can enter."""
    result = subprocess.run(
        proc.as_user(argv, _user()),
        cwd=paths.postgres_dir(),
        capture_output=True,
        text=True,
        check=False,
        start_new_session=True,
    )
    if check and result.returncode != 0:
        output = result.stdout + result.stderr
        raise proc.StackError(f"{Path(argv[0]).name} failed ({result.returncode}):\n{output}")
    return result


def _prepare_dirs() -> None:
    root = paths.postgres_dir()
    for d in (root, socket_dir()):
        d.mkdir(parents=True, exist_ok=True)
    if _user():
        pw = pwd.getpwnam(OS_USER)
        for d in (root, socket_dir()):
            os.chown(d, pw.pw_uid, pw.pw_gid)
        for parent in [paths.state_dir(), *paths.state_dir().parents]:
            if not os.stat(parent).st_mode & 0o001:
                raise proc.StackError(f"user postgres cannot enter {parent}; set BROADCAST_STACK_DIR elsewhere")


def _initdb(bindir: Path) -> None:
    if (data_dir() / "PG_VERSION").exists():
        return
    shutil.rmtree(data_dir(), ignore_errors=True)
    _run(
        [
            str(bindir / "initdb"),
            "-D",
            str(data_dir()),
            "-U",
            "postgres",
            "-E",
            "UTF8",
            "--locale=C",
            "--auth-local=trust",
            "--auth-host=trust",
        ]
    )
    (data_dir() / "pg_hba.conf").write_text(
        "# devstack: trust on the private socket and 127.0.0.1 only\n"
        "local all all trust\n"
        "host  all all 127.0.0.1/32 trust\n"
    )
    with (data_dir() / "postgresql.conf").open("a") as conf:
        conf.write(
            "\n# devstack\n"
            f"listen_addresses = '{paths.HOST}'\n"
            f"port = {paths.POSTGRES_PORT}\n"
            f"unix_socket_directories = '{socket_dir()}'\n"
            "fsync = on\n"
        )


def pid() -> int | None:
    """The postmaster's pid (from postmaster.pid) if it is running on our data dir, else None."""
    try:
        first = (data_dir() / "postmaster.pid").read_text().splitlines()[0]
        candidate = int(first)
    except (OSError, ValueError, IndexError):
        return None
    return candidate if proc.is_running(candidate, str(data_dir())) else None


def _psql(sql: str, *, db: str = "postgres", user: str = "postgres", tcp: bool = False) -> str:
    host = paths.HOST if tcp else str(socket_dir())
    psql = str(bin_dir() / "psql")
    argv = [
        psql,
        "-X",
        "-q",
        "-tA",
        "-v",
        "ON_ERROR_STOP=1",
        "-h",
        host,
        "-p",
        str(paths.POSTGRES_PORT),
        "-U",
        user,
        "-d",
        db,
        "-c",
        sql,
    ]
    return _run(argv).stdout.strip()


def _create_db() -> None:
    """Create the ``broadcast`` role and database unless they exist (names are fixed constants)."""
    user, pw, db = paths.DB_USER, paths.DB_PASSWORD, paths.DB_NAME
    if _psql(f"SELECT 1 FROM pg_roles WHERE rolname = '{user}'") != "1":  # noqa: S608
        _psql(f"CREATE ROLE {user} LOGIN SUPERUSER PASSWORD '{pw}'")
    if _psql(f"SELECT 1 FROM pg_database WHERE datname = '{db}'") != "1":  # noqa: S608
        _psql(f"CREATE DATABASE {db} OWNER {user}")


def start() -> None:
    """initdb if needed, start the server unless running, create role and database; waits until up."""
    bindir = bin_dir()
    _prepare_dirs()
    _initdb(bindir)
    if pid() is None:
        proc.ensure_free([paths.POSTGRES_PORT], "PostgreSQL")
        pg_ctl = str(bindir / "pg_ctl")
        options = " ".join(f"-c {name}={value}" for name, value in SERVER_SETTINGS.items())
        _run([pg_ctl, "-D", str(data_dir()), "-l", str(log_file()), "-o", options, "-w", "-t", "60", "start"])
    _create_db()


def ready() -> bool:
    """True if the server accepts a real query over TCP as the ``broadcast`` role."""
    if not proc.port_open(paths.POSTGRES_PORT):
        return False
    try:
        return _psql("SELECT 1", db=paths.DB_NAME, user=paths.DB_USER, tcp=True) == "1"
    except proc.StackError:
        return False


def stop(mode: Literal["smart", "fast", "immediate"] = "fast") -> None:
    """Stop with ``pg_ctl -m <mode>`` (falls back to SIGTERM/SIGKILL of the recorded postmaster pid).

    ``fast`` rolls back open transactions and checkpoints; ``immediate`` aborts every process without a
    checkpoint, like a crash (the next start runs crash recovery).
    """
    running = pid()
    if running is None:
        return
    result = _run(
        [str(bin_dir() / "pg_ctl"), "-D", str(data_dir()), "-m", mode, "-w", "-t", "30", "stop"],
        check=False,
    )
    if result.returncode != 0:
        proc.terminate([running], grace=10.0)
