"""The local 3-node Apache Kafka KRaft cluster: jars from Maven Central, format once, start, check, stop.

Each node is a combined broker+controller of a static quorum (``controller.quorum.voters``), rendered from
``kafka-node.properties``. Nodes are formatted once with a shared cluster id and the SCRAM users, and are
never reformatted. See docs/KAFKA.md for the facts behind these choices.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import shutil
import signal
import string
import subprocess
import time
import uuid
from collections.abc import Awaitable, Callable
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar

from devstack import paths, proc

T = TypeVar("T")
READY_TIMEOUT = 120.0
# The full suite creates each test's own topics (six of 10 partitions, RF 3, since the priority topic): a run
# had over 6,000 partition replicas per broker 40 % of the way in, when 512 MB of heap ran out
# (OutOfMemoryError in two brokers, then every later Kafka test failed). 2 GB leaves room (3 brokers: 6 of 24 GB).
JVM_OPTS = ["-Xms512m", "-Xmx2g", "-XX:+UseG1GC", "-XX:MaxGCPauseMillis=20", "-Djava.awt.headless=true"]
_COMPLETE = ".complete"


def _template(name: str) -> str:
    return resources.files("devstack").joinpath(name).read_text()


# --- jars -------------------------------------------------------------------------------------------------


def home() -> Path:
    """The cached Kafka distribution: ``<cache>/kafka-4.1.1`` holding ``libs/`` and the resolving POM."""
    return paths.cache_dir() / f"kafka-{paths.KAFKA_VERSION}"


def libs_dir() -> Path:
    """The directory with every runtime jar of the broker."""
    return home() / "libs"


def ensure_java() -> None:
    """Install a JRE and Maven from Debian if ``java`` or ``mvn`` is missing."""
    proc.ensure_binaries(["java", "mvn"], ["default-jre-headless", "maven"])


def ensure_jars() -> bool:
    """Resolve the broker's runtime jars into the cache unless already complete; True if it downloaded."""
    if (home() / _COMPLETE).exists():
        return False
    ensure_java()
    home().mkdir(parents=True, exist_ok=True)
    pom = home() / "kafka-runtime.pom"
    pom.write_text(_template("kafka-runtime.pom"))
    staging = home() / "libs.partial"
    shutil.rmtree(staging, ignore_errors=True)
    shutil.rmtree(libs_dir(), ignore_errors=True)
    cmd = [
        "mvn",
        "-B",
        "-q",
        "-f",
        str(pom),
        f"-Dmaven.repo.local={home() / 'm2'}",
        "org.apache.maven.plugins:maven-dependency-plugin:3.8.1:copy-dependencies",
        "-DincludeScope=runtime",
        f"-DoutputDirectory={staging}",
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        output = result.stdout[-3000:] + result.stderr[-2000:]
        raise proc.StackError(f"mvn could not resolve the Kafka jars:\n{output}")
    staging.rename(libs_dir())
    smoke = subprocess.run(
        ["java", "-cp", f"{libs_dir()}/*", "kafka.Kafka", "--version"],
        capture_output=True,
        text=True,
        check=False,
    )
    if smoke.returncode != 0 or paths.KAFKA_VERSION not in smoke.stdout + smoke.stderr:
        raise proc.StackError(f"Kafka jar smoke test failed:\n{smoke.stdout}{smoke.stderr}")
    (home() / _COMPLETE).write_text(f"{paths.KAFKA_VERSION}\n")
    return True


# --- per-node files -----------------------------------------------------------------------------------------


def properties_file(node: int) -> Path:
    """The rendered server properties of ``node`` (its path also identifies the node's process)."""
    return paths.kafka_dir() / f"node{node}.properties"


def data_dir(node: int) -> Path:
    """The node's ``log.dirs``: its formatted metadata and topic data."""
    return paths.kafka_dir() / f"node{node}"


def pid_file(node: int) -> Path:
    return paths.kafka_dir() / f"node{node}.pid"


def log_file(node: int) -> Path:
    """Where the node's console output goes."""
    return paths.kafka_dir() / f"node{node}.log"


def ports(node: int) -> list[int]:
    """The node's plaintext, controller and SCRAM ports."""
    return [paths.kafka_plain_port(node), paths.kafka_controller_port(node), paths.kafka_scram_port(node)]


def cluster_id() -> str:
    """The cluster id shared by the three nodes, created once and kept in the state dir."""
    path = paths.kafka_dir() / "cluster.id"
    if not path.exists() or path.read_text().startswith("-"):
        path.write_text(new_cluster_id() + "\n")
    return path.read_text().strip()


def new_cluster_id() -> str:
    """A base64url UUID that does not start with ``-`` (the storage tool would read it as an option; Kafka's
    own ``random-uuid`` skips those too). One in 64 random ids does."""
    while (cid := base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")).startswith("-"):
        pass
    return cid


def _write_configs() -> None:
    paths.kafka_dir().mkdir(parents=True, exist_ok=True)
    template = string.Template(_template("kafka-node.properties"))
    for node in paths.KAFKA_NODES:
        properties_file(node).write_text(template.substitute(node=node, log_dir=data_dir(node)))
    (paths.kafka_dir() / "log4j2.properties").write_text(_template("kafka-log4j2.properties"))


def _format_missing() -> None:
    """Format every node whose data dir is not formatted yet (in parallel); never touch a formatted one."""
    cid = cluster_id()
    scram = [
        a
        for user, pw in paths.SCRAM_USERS.items()
        for a in ("--add-scram", f"{paths.SCRAM_MECHANISM}=[name={user},password={pw}]")
    ]
    running: list[tuple[int, subprocess.Popen[str]]] = []
    for node in paths.KAFKA_NODES:
        if (data_dir(node) / "meta.properties").exists():
            continue
        cmd = [
            "java",
            "-Xmx512m",
            "-cp",
            f"{libs_dir()}/*",
            "kafka.tools.StorageTool",
            "format",
            "-t",
            cid,
            "-c",
            str(properties_file(node)),
            *scram,
        ]
        running.append((node, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)))
    for node, child in running:
        out, _ = child.communicate()
        if child.returncode != 0:
            raise proc.StackError(f"formatting Kafka node {node} failed:\n{out}")


# --- processes ----------------------------------------------------------------------------------------------


def node_command(node: int) -> list[str]:
    """The exact command line that runs ``node``."""
    log4j = paths.kafka_dir() / "log4j2.properties"
    return [
        "java",
        *JVM_OPTS,
        f"-Dlog4j2.configurationFile={log4j}",
        "-cp",
        f"{libs_dir()}/*",
        "kafka.Kafka",
        str(properties_file(node)),
    ]


def node_pid(node: int) -> int | None:
    """The pid of the running ``node`` we started, or None."""
    return proc.read_pid(pid_file(node))


def start_node(node: int) -> None:
    """Start ``node`` (already formatted) in the background unless it is running; does not wait."""
    if node_pid(node) is not None:
        return
    proc.ensure_free(ports(node), f"Kafka node {node}")
    pid = proc.spawn_detached(node_command(node), log_file(node), cwd=paths.kafka_dir())
    proc.write_pid(pid_file(node), pid, str(properties_file(node)))


def kill_node(node: int, sig: int = signal.SIGKILL) -> None:
    """Send ``sig`` to ``node``; for SIGKILL/SIGTERM also wait until it is gone (ports released)."""
    pid = node_pid(node)
    if pid is None:
        return
    proc.signal_pid(pid, sig)
    if sig in (signal.SIGKILL, signal.SIGTERM) and proc.wait_gone([pid], 30.0):
        raise proc.StackError(f"Kafka node {node} (pid {pid}) did not exit after signal {sig}")


def prepare() -> None:
    """Install Java and jars if missing, write the node configs and format unformatted nodes."""
    ensure_java()
    ensure_jars()
    _write_configs()
    _format_missing()


def start() -> None:
    """Start every node that is not running, all at once (staggering them risks a quorum timeout)."""
    for node in paths.KAFKA_NODES:
        start_node(node)


def stop() -> None:
    """SIGTERM all running nodes at the same time, then SIGKILL what is left after 20 s."""
    pids = [p for p in (node_pid(n) for n in paths.KAFKA_NODES) if p is not None]
    proc.terminate(pids, grace=20.0)


def set_scram_user(user: str, password: str | None) -> None:
    """Add ``user``'s SCRAM credential (or replace its password), or with None delete it (a no-op if it has
    none), through the cluster (``ConfigCommand``, as ``kafka-configs.sh --entity-type users`` does): a
    credential rotation needs no restart."""
    change = (
        ["--add-config", f"{paths.SCRAM_MECHANISM}=[password={password}]"]
        if password is not None
        else ["--delete-config", paths.SCRAM_MECHANISM]
    )
    cmd = ["java", "-Xmx256m", "-cp", f"{libs_dir()}/*", "kafka.admin.ConfigCommand", "--bootstrap-server"]
    cmd += [bootstrap(), "--alter", *change, "--entity-type", "users", "--entity-name", user]
    result = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=120)
    if password is None and "credential that does not exist" in result.stdout + result.stderr:
        return
    if result.returncode != 0:
        raise proc.StackError(f"changing the SCRAM credential of {user} failed:\n{result.stdout}{result.stderr}")


# --- readiness ----------------------------------------------------------------------------------------------


def bootstrap() -> str:
    """The plaintext bootstrap list of all three nodes."""
    return ",".join(f"{paths.HOST}:{paths.kafka_plain_port(n)}" for n in paths.KAFKA_NODES)


async def _admin_call(call: Callable[[Any], Awaitable[T]], limit: float = 10.0) -> T:
    """Run ``call(admin)`` with a short-lived plaintext admin client, each step bounded by ``limit`` s."""
    from aiokafka.admin import AIOKafkaAdminClient

    quiet = logging.getLogger("aiokafka")
    level = quiet.level
    quiet.setLevel(logging.CRITICAL)  # connection errors while nodes boot are expected, not news
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap(), request_timeout_ms=int(limit * 1000))
    try:
        await asyncio.wait_for(admin.start(), limit)
        return await asyncio.wait_for(call(admin), limit)
    finally:
        await admin.close()
        quiet.setLevel(level)


def registered_brokers() -> set[int]:
    """The ids of the brokers the cluster metadata lists as alive (empty if the cluster is unreachable)."""

    async def ids(admin: Any) -> set[int]:
        cluster = await admin.describe_cluster()
        return {int(b["node_id"]) for b in cluster["brokers"]}

    try:
        return proc.run_async(lambda: _admin_call(ids, limit=5.0))
    except Exception:
        return set()


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def wait_ready(nodes: tuple[int, ...] = paths.KAFKA_NODES, timeout: float = READY_TIMEOUT) -> None:
    """Wait until every node in ``nodes`` is a registered broker; fail early if one of them died."""
    deadline = time.monotonic() + timeout
    while not set(nodes) <= registered_brokers():
        for node in nodes:
            if node_pid(node) is None:
                raise proc.StackError(
                    f"Kafka node {node} exited; last lines of {log_file(node)}:\n" + _tail(log_file(node))
                )
        if time.monotonic() > deadline:
            raise proc.StackError(
                f"Kafka nodes {nodes} not registered after {timeout:.0f}s; see logs in {paths.kafka_dir()}"
            )
        time.sleep(1.0)


def ensure_offsets_topic(timeout: float = 60.0) -> None:
    """Make sure ``__consumer_offsets`` exists (created lazily on the first group coordinator lookup)."""

    async def touch(admin: Any) -> bool:
        if "__consumer_offsets" in await admin.list_topics():
            return True
        try:
            await admin.find_coordinator("devstack-warmup")
        except Exception:
            return False
        return "__consumer_offsets" in await admin.list_topics()

    def check() -> bool:
        try:
            return proc.run_async(lambda: _admin_call(touch))
        except Exception:
            return False

    proc.wait_until(check, timeout, "__consumer_offsets to be created", interval=1.0)
