"""docker-compose.yml, the Dockerfile and .dockerignore agree with ``broadcast.core.settings`` and ``constants``.

No Docker engine runs here, so the files are checked statically: parsed with PyYAML (which resolves the
compose file's anchors and merge keys the way Compose does) and compared with the names and numbers the
code uses. Renaming a topic, changing a replication factor, moving a settings field or the app's port
without updating the deployment files makes one of these tests fail.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import re
import shlex
import tomllib
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml
from pydantic import BaseModel

from broadcast.core import constants
from broadcast.core.settings import Settings
from devstack.postgres import SERVER_SETTINGS

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
PYPROJECT = ROOT / "pyproject.toml"

BROKERS = ("kafka-1", "kafka-2", "kafka-3")
KAFKA_IMAGE = "apache/kafka:4.1.1"
APP_SERVICES = ("app", "migrate")
TOPICS_SCRIPT = "/opt/kafka/bin/kafka-topics.sh"
# What the test substitutes for a required variable (``${VAR:?message}``) that the operator must set.
REQUIRED_VARIABLE_VALUE = "compose-test-secret-0123456789abcdef0123456789abcdef"

Service = dict[str, Any]

_INTERPOLATION = re.compile(
    r"\$\$|\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}|\$(?P<bare>[A-Za-z_]\w*)"
)


# --------------------------------------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def services() -> dict[str, Service]:
    loaded = yaml.safe_load(COMPOSE_FILE.read_text(encoding="utf-8"))
    assert isinstance(loaded, dict), "docker-compose.yml is not a mapping"
    found = loaded.get("services")
    assert isinstance(found, dict) and found, "docker-compose.yml has no services"
    for name, service in found.items():
        assert isinstance(service, dict), f"service {name} is not a mapping"
    return found


@pytest.fixture(scope="module")
def declared_volumes() -> set[str]:
    loaded = yaml.safe_load(COMPOSE_FILE.read_text(encoding="utf-8"))
    assert isinstance(loaded, dict)
    volumes = loaded.get("volumes") or {}
    assert isinstance(volumes, dict)
    return set(volumes)


def service(services: dict[str, Service], name: str) -> Service:
    assert name in services, f"docker-compose.yml has no service {name!r}"
    return services[name]


def environment(svc: Service) -> dict[str, str]:
    """A service's environment as strings, accepting the mapping and the ``KEY=VALUE`` list forms."""
    raw = svc.get("environment") or {}
    result: dict[str, str] = {}
    if isinstance(raw, list):
        for item in raw:
            key, _, value = str(item).partition("=")
            result[key] = value
        return result
    assert isinstance(raw, dict), "environment must be a mapping or a list"
    for key, value in raw.items():
        # Compose refuses YAML booleans in environment mappings; they must be quoted strings.
        assert not isinstance(value, bool), f"environment {key} is a YAML boolean; quote it"
        result[str(key)] = "" if value is None else str(value)
    return result


def interpolate(value: str) -> str:
    """Compose's variable substitution, with every required variable set to a dummy and nothing else set."""

    def replace(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        op = match.group("op") or ""
        if "?" in op:
            return REQUIRED_VARIABLE_VALUE
        if "-" in op:
            return match.group("arg") or ""
        return ""

    return _INTERPOLATION.sub(replace, value)


def command_args(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return shlex.split(value)
    assert isinstance(value, list), "command/entrypoint must be a string or a list"
    return [str(item) for item in value]


def listeners(spec: str) -> dict[str, tuple[str, int]]:
    """``NAME://host:port,...`` as ``{NAME: (host, port)}``."""
    result: dict[str, tuple[str, int]] = {}
    for item in filter(None, (part.strip() for part in spec.split(","))):
        name, sep, address = item.partition("://")
        assert sep, f"listener {item!r} has no NAME://"
        host, _, port = address.rpartition(":")
        result[name.upper()] = (host, int(port))
    return result


def broker_env(services: dict[str, Service], name: str) -> dict[str, str]:
    return environment(service(services, name))


def internal_endpoint(services: dict[str, Service], name: str) -> str:
    """``host:port`` a broker advertises on its inter-broker (internal) listener."""
    env = broker_env(services, name)
    internal = env["KAFKA_INTER_BROKER_LISTENER_NAME"].upper()
    advertised = listeners(env["KAFKA_ADVERTISED_LISTENERS"])
    assert internal in advertised, f"{name} does not advertise its inter-broker listener {internal}"
    host, port = advertised[internal]
    return f"{host}:{port}"


def settings_field_error(env_name: str) -> str | None:
    """Why ``env_name`` names no leaf field of :class:`Settings`, or None when it does."""
    prefix = str(Settings.model_config.get("env_prefix") or "")
    delimiter = str(Settings.model_config.get("env_nested_delimiter") or "__")
    if not env_name.upper().startswith(prefix.upper()):
        return f"{env_name} lacks the prefix {prefix}"
    parts = env_name[len(prefix) :].lower().split(delimiter)
    model: type[BaseModel] = Settings
    for index, part in enumerate(parts):
        fields = model.model_fields
        if part not in fields:
            return f"{env_name}: {model.__name__} has no field {part!r} (fields: {sorted(fields)})"
        annotation = fields[part].annotation
        is_section = isinstance(annotation, type) and issubclass(annotation, BaseModel)
        if index == len(parts) - 1:
            return f"{env_name} names the whole section {part!r}, not a field" if is_section else None
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return f"{env_name}: {model.__name__}.{part} is not a section"
        model = annotation
    return f"{env_name} names no field"


def dockerfile_instructions() -> list[tuple[str, str]]:
    """``(INSTRUCTION, arguments)`` pairs, continuation lines joined and comments dropped."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for line in DOCKERFILE.read_text(encoding="utf-8").splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        full = pending + stripped
        pending = ""
        keyword, _, rest = full.partition(" ")
        instructions.append((keyword.upper(), rest.strip()))
    assert not pending, "Dockerfile ends inside a continuation line"
    return instructions


def final_stage() -> list[tuple[str, str]]:
    instructions = dockerfile_instructions()
    starts = [index for index, (keyword, _) in enumerate(instructions) if keyword == "FROM"]
    assert starts, "Dockerfile has no FROM"
    return instructions[starts[-1] :]


def exposed_port() -> int:
    ports = [rest.split("/")[0] for keyword, rest in final_stage() if keyword == "EXPOSE"]
    assert len(ports) == 1, f"expected one EXPOSE in the final stage, found {ports}"
    return int(ports[0])


def option(args: list[str], name: str) -> str:
    assert name in args, f"{name} missing from {args}"
    index = args.index(name)
    assert index + 1 < len(args), f"{name} has no value in {args}"
    return args[index + 1]


def console_scripts() -> set[str]:
    project = tomllib.loads(PYPROJECT.read_text(encoding="utf-8"))["project"]
    scripts = project.get("scripts", {})
    assert isinstance(scripts, dict)
    return set(scripts)


# ------------------------------------------------------------------------------------------- brokers


def test_three_brokers_share_one_cluster_id_and_distinct_node_ids(services: dict[str, Service]) -> None:
    cluster_ids = set()
    node_ids = set()
    for name in BROKERS:
        svc = service(services, name)
        env = environment(svc)
        assert svc.get("image") == KAFKA_IMAGE, f"{name} must run {KAFKA_IMAGE}"
        assert set(env["KAFKA_PROCESS_ROLES"].split(",")) == {"broker", "controller"}, name
        cluster_ids.add(env["CLUSTER_ID"])
        node_ids.add(int(env["KAFKA_NODE_ID"]))
    assert len(cluster_ids) == 1, f"brokers disagree on CLUSTER_ID: {cluster_ids}"
    (cluster_id,) = cluster_ids
    decoded = base64.urlsafe_b64decode(cluster_id + "=" * (-len(cluster_id) % 4))
    assert len(decoded) == 16, "CLUSTER_ID must be a base64url-encoded UUID (kafka-storage.sh random-uuid)"
    assert len(node_ids) == len(BROKERS), f"node ids must be distinct: {node_ids}"


def test_quorum_voters_name_all_three_brokers_on_their_controller_port(
    services: dict[str, Service],
) -> None:
    voters_specs = {broker_env(services, name)["KAFKA_CONTROLLER_QUORUM_VOTERS"] for name in BROKERS}
    assert len(voters_specs) == 1, f"brokers disagree on controller.quorum.voters: {voters_specs}"
    (spec,) = voters_specs
    voters: dict[str, tuple[int, int]] = {}
    for voter in spec.split(","):
        voter_id, _, address = voter.strip().partition("@")
        host, _, voter_port = address.rpartition(":")
        voters[host] = (int(voter_id), int(voter_port))
    assert set(voters) == set(BROKERS), f"quorum voters {sorted(voters)} != broker services {BROKERS}"
    for name in BROKERS:
        env = broker_env(services, name)
        node_id, port = voters[name]
        assert node_id == int(env["KAFKA_NODE_ID"]), f"{name}: voter id {node_id} != KAFKA_NODE_ID"
        controller = env["KAFKA_CONTROLLER_LISTENER_NAMES"].upper()
        bound = listeners(env["KAFKA_LISTENERS"])
        assert controller in bound, f"{name} has no {controller} listener"
        assert bound[controller][1] == port, f"{name}: voter port {port} != controller listener port"


def test_brokers_advertise_their_service_name_on_the_internal_listener(
    services: dict[str, Service],
) -> None:
    for name in BROKERS:
        env = broker_env(services, name)
        protocol_map = dict(
            item.upper().split(":", 1) for item in env["KAFKA_LISTENER_SECURITY_PROTOCOL_MAP"].split(",")
        )
        bound = listeners(env["KAFKA_LISTENERS"])
        advertised = listeners(env["KAFKA_ADVERTISED_LISTENERS"])
        for listener in (*bound, env["KAFKA_INTER_BROKER_LISTENER_NAME"].upper()):
            assert listener in protocol_map, f"{name}: listener {listener} missing from the protocol map"
        host, port = advertised[env["KAFKA_INTER_BROKER_LISTENER_NAME"].upper()]
        assert host == name, f"{name} advertises {host}, which other containers cannot resolve as {name}"
        assert bound[env["KAFKA_INTER_BROKER_LISTENER_NAME"].upper()][1] == port, name


def test_broker_defaults_agree_with_constants(services: dict[str, Service]) -> None:
    expected = {
        "KAFKA_NUM_PARTITIONS": str(constants.TOPIC_PARTITIONS),
        "KAFKA_DEFAULT_REPLICATION_FACTOR": str(constants.TOPIC_REPLICATION_FACTOR),
        "KAFKA_MIN_INSYNC_REPLICAS": str(constants.TOPIC_MIN_INSYNC_REPLICAS),
        "KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR": str(constants.TOPIC_REPLICATION_FACTOR),
        "KAFKA_TRANSACTION_STATE_LOG_REPLICATION_FACTOR": str(constants.TOPIC_REPLICATION_FACTOR),
        "KAFKA_TRANSACTION_STATE_LOG_MIN_ISR": str(constants.TOPIC_MIN_INSYNC_REPLICAS),
        "KAFKA_UNCLEAN_LEADER_ELECTION_ENABLE": "false",
        "KAFKA_AUTO_CREATE_TOPICS_ENABLE": "false",
    }
    assert len(BROKERS) >= constants.TOPIC_REPLICATION_FACTOR
    for name in BROKERS:
        env = broker_env(services, name)
        actual = {key: env.get(key, "<unset>").lower() for key in expected}
        assert actual == expected, f"{name} broker defaults disagree with broadcast.core.constants"


def test_brokers_keep_their_logs_on_named_volumes_and_have_healthchecks(
    services: dict[str, Service], declared_volumes: set[str]
) -> None:
    used: set[str] = set()
    for name in BROKERS:
        svc = service(services, name)
        log_dir = environment(svc)["KAFKA_LOG_DIRS"]
        mounts = {}
        for volume in svc.get("volumes") or []:
            source, _, target = str(volume).partition(":")
            mounts[target.split(":")[0]] = source
        assert log_dir in mounts, f"{name}: KAFKA_LOG_DIRS {log_dir} is not on a volume"
        assert mounts[log_dir] in declared_volumes, f"{name}: {mounts[log_dir]} is not a named volume"
        used.add(mounts[log_dir])
        assert svc.get("healthcheck", {}).get("test"), f"{name} has no healthcheck"
    assert len(used) == len(BROKERS), "each broker needs its own data volume"


# -------------------------------------------------------------------------------------------- topics


def topic_creations(svc: Service) -> list[argparse.Namespace]:
    script = "\n".join(command_args(svc.get("entrypoint")) + command_args(svc.get("command")))
    script = script.replace("\\\n", " ")
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--create", action="store_true")
    parser.add_argument("--if-not-exists", action="store_true")
    parser.add_argument("--bootstrap-server")
    parser.add_argument("--topic")
    parser.add_argument("--partitions", type=int)
    parser.add_argument("--replication-factor", type=int)
    parser.add_argument("--config", action="append", default=[])
    creations = []
    for line in script.splitlines():
        for segment in re.split(r"&&|;|\|\|", line):
            args = shlex.split(segment)
            if args and args[0] == TOPICS_SCRIPT and "--create" in args:
                parsed, _ = parser.parse_known_args(args[1:])
                creations.append(parsed)
    return creations


def test_topic_init_creates_exactly_the_constant_topics(services: dict[str, Service]) -> None:
    svc = service(services, "topic-init")
    assert svc.get("image") == KAFKA_IMAGE
    creations = topic_creations(svc)
    topics = [created.topic for created in creations]
    assert sorted(topics) == sorted(constants.ALL_TOPICS), f"topic-init creates {topics}"
    internal = {internal_endpoint(services, name) for name in BROKERS}
    for created in creations:
        assert created.if_not_exists, f"{created.topic}: --if-not-exists keeps topic-init re-runnable"
        assert created.partitions == constants.TOPIC_PARTITIONS, created.topic
        assert created.replication_factor == constants.TOPIC_REPLICATION_FACTOR, created.topic
        configs = dict(item.split("=", 1) for item in created.config)
        assert configs.get("min.insync.replicas") == str(constants.TOPIC_MIN_INSYNC_REPLICAS), created.topic
        assert set(created.bootstrap_server.split(",")) <= internal, created.bootstrap_server


def test_topic_init_waits_for_healthy_brokers(services: dict[str, Service]) -> None:
    depends = service(services, "topic-init").get("depends_on") or {}
    assert isinstance(depends, dict), "depends_on needs the long form to wait for health"
    for name in BROKERS:
        assert depends.get(name, {}).get("condition") == "service_healthy", f"topic-init must wait for {name}"


# -------------------------------------------------------------------------------------- app settings


@pytest.mark.parametrize("name", APP_SERVICES)
def test_broadcast_env_vars_are_settings_fields(services: dict[str, Service], name: str) -> None:
    env = environment(service(services, name))
    broadcast_vars = [key for key in env if key.upper().startswith("BROADCAST_")]
    assert broadcast_vars, f"{name} sets no BROADCAST_* variables"
    errors = [error for key in broadcast_vars if (error := settings_field_error(key)) is not None]
    assert not errors, "\n".join(errors)


def test_field_walk_rejects_unknown_names() -> None:
    assert settings_field_error("BROADCAST_KAFKA__BOOTSTRAP_SERVERS") is None
    assert settings_field_error("BROADCAST_KAFKA__BOOTSTRAP_SERVER") is not None
    assert settings_field_error("BROADCAST_KAFKA_BOOTSTRAP_SERVERS") is not None
    assert settings_field_error("BROADCAST_KAFKA") is not None
    assert settings_field_error("BROADCAST_ENVIRONMENT__X") is not None


@pytest.mark.parametrize("name", APP_SERVICES)
def test_settings_build_from_the_service_env(
    services: dict[str, Service], name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    for key in list(os.environ):
        if key.upper().startswith("BROADCAST_"):
            monkeypatch.delenv(key)
    for key, value in environment(service(services, name)).items():
        resolved = interpolate(value)
        assert "$" not in resolved, f"{name}: {key} keeps an unresolved variable: {value}"
        monkeypatch.setenv(key, resolved)

    settings = Settings()

    assert settings.environment == "production"
    assert not settings.embedded
    assert settings.database.dialect == "postgresql"
    assert not settings.redis.embedded
    assert settings.auth.jwt_secret.get_secret_value() == REQUIRED_VARIABLE_VALUE
    assert settings.kafka.partitions == constants.TOPIC_PARTITIONS
    assert settings.kafka.replication_factor == constants.TOPIC_REPLICATION_FACTOR
    assert settings.kafka.min_insync_replicas == constants.TOPIC_MIN_INSYNC_REPLICAS
    bootstrap = [item.strip() for item in settings.kafka.bootstrap_servers.split(",")]
    assert sorted(bootstrap) == sorted(internal_endpoint(services, broker) for broker in BROKERS)

    postgres_env = environment(service(services, "postgres"))
    database = urlsplit(settings.database.url.get_secret_value())
    assert database.hostname in services and database.hostname == "postgres"
    assert database.port == 5432
    assert database.username == postgres_env["POSTGRES_USER"]
    assert database.password == postgres_env["POSTGRES_PASSWORD"]
    assert database.path.lstrip("/") == postgres_env["POSTGRES_DB"]
    assert settings.redis.url is not None
    redis = urlsplit(settings.redis.url.get_secret_value())
    assert redis.hostname in services and redis.port == 6379


def test_jwt_secret_comes_from_the_operator(services: dict[str, Service]) -> None:
    for name in APP_SERVICES:
        secret = environment(service(services, name)).get("BROADCAST_AUTH__JWT_SECRET", "")
        assert re.fullmatch(r"\$\{BROADCAST_AUTH__JWT_SECRET:\?[^}]*\}", secret), (
            f"{name}: the JWT secret must be required from the environment, not defaulted: {secret!r}"
        )


def test_services_start_in_dependency_order(services: dict[str, Service]) -> None:
    def conditions(name: str) -> dict[str, str]:
        depends = service(services, name).get("depends_on") or {}
        assert isinstance(depends, dict), f"{name}: depends_on needs the long form"
        return {key: value.get("condition", "") for key, value in depends.items()}

    app = conditions("app")
    assert app.get("topic-init") == "service_completed_successfully"
    assert app.get("migrate") == "service_completed_successfully"
    assert app.get("redis") == "service_healthy"
    assert conditions("migrate").get("postgres") == "service_healthy"
    assert command_args(service(services, "migrate").get("command")) == ["broadcast-server", "migrate"]
    assert "pg_isready" in " ".join(command_args(service(services, "postgres")["healthcheck"]["test"]))
    assert "redis-cli ping" in " ".join(command_args(service(services, "redis")["healthcheck"]["test"]))
    assert service(services, "migrate").get("build") == service(services, "app").get("build")


def test_postgres_runs_with_the_write_load_settings_of_the_local_stack(services: dict[str, Service]) -> None:
    args = command_args(service(services, "postgres").get("command"))
    assert args[:1] == ["postgres"], args
    given = dict(value.split("=", 1) for flag, value in zip(args[1::2], args[2::2], strict=True) if flag == "-c")
    assert given == SERVER_SETTINGS, "docker-compose.yml's PostgreSQL settings differ from devstack/postgres.py"


def test_app_port_matches_dockerfile_and_command(services: dict[str, Service]) -> None:
    app = service(services, "app")
    args = command_args(app.get("command"))
    assert args[:2] == ["broadcast-server", "run"], args
    port = int(option(args, "--port"))
    assert port == exposed_port(), f"app --port {port} != Dockerfile EXPOSE {exposed_port()}"
    container_ports = {int(str(mapping).split("/")[0].rsplit(":", 1)[-1]) for mapping in app.get("ports", [])}
    assert container_ports == {port}, f"app publishes container ports {container_ports}, listens on {port}"
    healthcheck = " ".join(command_args(app["healthcheck"]["test"]))
    assert f":{port}/health/ready" in healthcheck, healthcheck


# ------------------------------------------------------------------------------------------ Dockerfile


def test_dockerfile_installs_the_project_and_runs_the_server() -> None:
    stage = final_stage()
    assert stage[0][1].split()[0] == "python:3.11-slim"
    installs = []
    for keyword, rest in dockerfile_instructions():
        if keyword != "RUN":
            continue
        for segment in re.split(r"&&|;", rest):
            args = shlex.split(segment)
            if "pip" in {Path(arg).name.rstrip("0123456789.") for arg in args[:3]} and "install" in args:
                installs.append([arg for arg in args[args.index("install") + 1 :] if not arg.startswith("-")])
    assert any("." in targets for targets in installs), f"no `pip install .` in the Dockerfile: {installs}"

    users = [rest for keyword, rest in stage if keyword == "USER"]
    assert users and users[-1].split(":")[0] not in {"root", "0"}, "the image must run as a non-root user"

    cmds = [rest for keyword, rest in stage if keyword == "CMD"]
    assert cmds, "Dockerfile has no CMD"
    cmd = json.loads(cmds[-1])
    assert isinstance(cmd, list), "CMD must use the exec (JSON) form"
    assert cmd[0] in console_scripts(), f"{cmd[0]} is not a console script in pyproject.toml"
    assert cmd[:2] == ["broadcast-server", "run"], cmd
    assert int(option(cmd, "--port")) == exposed_port()

    healthchecks = [rest for keyword, rest in stage if keyword == "HEALTHCHECK"]
    assert len(healthchecks) == 1, "Dockerfile needs one HEALTHCHECK"
    assert "urllib" in healthchecks[0]
    assert f":{exposed_port()}/health/live" in healthchecks[0], healthchecks[0]


def test_dockerignore_keeps_local_state_out_and_the_project_in() -> None:
    patterns = {
        line.strip().rstrip("/")
        for line in DOCKERIGNORE.read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.startswith("#")
    }
    for required in (".venv", ".git"):
        assert required in patterns, f".dockerignore must exclude {required}"
    assert patterns & {"*.db", "**/*.db"}, ".dockerignore must exclude SQLite files"
    assert patterns & {"__pycache__", "**/__pycache__"}, ".dockerignore must exclude caches"
    project = tomllib.loads(PYPROJECT.read_text(encoding="utf-8"))
    needed = {"pyproject.toml", str(project["project"].get("readme", "pyproject.toml"))}
    packages = project["tool"]["setuptools"]["packages"]["find"]["include"]
    needed |= {pattern.rstrip("*") for pattern in packages}
    assert not patterns & needed, f".dockerignore excludes files `pip install .` needs: {patterns & needed}"
