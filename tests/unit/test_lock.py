"""The lock (requirements/*.txt, compiled by scripts/lock.sh) is what every install uses, and it agrees with
pyproject.toml: every dependency pinned to one version inside its range, with hashes, and the runtime lock a
subset of the dev lock at the same versions. A dependency added to pyproject.toml without `make lock` fails
here, before a fresh machine installs something nobody resolved.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from packaging.markers import Marker
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
RUNTIME_LOCK = ROOT / "requirements" / "runtime.txt"
DEV_LOCK = ROOT / "requirements" / "dev.txt"
BUILD_IN = ROOT / "requirements" / "build.in"
# the platforms the lock must install on: CI and the image (Linux, 3.11), a developer's 3.12
ENVIRONMENTS = [
    {"python_version": "3.11", "python_full_version": "3.11.7", "sys_platform": "linux"},
    {"python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux"},
]
_PIN = re.compile(r"^(?P<name>[A-Za-z0-9][A-Za-z0-9._-]*)==(?P<version>[^\s;\\]+)\s*(?:;(?P<marker>[^\\]+))?")


def pins(lock: Path) -> list[tuple[str, Version, Marker | None, int]]:
    """(name, version, marker, number of hashes) of each pin in ``lock``."""
    entries: list[tuple[str, Version, Marker | None, int]] = []
    for block in re.split(r"\n(?=\S)", lock.read_text(encoding="utf-8")):
        match = _PIN.match(block)
        if match is None:
            assert block.startswith("#") or not block.strip(), f"{lock.name}: not a pin: {block[:80]!r}"
            continue
        marker = Marker(match["marker"].strip()) if match["marker"] else None
        entries.append((canonicalize_name(match["name"]), Version(match["version"]), marker, block.count("--hash=")))
    return entries


def resolved(lock: Path, environment: dict[str, str]) -> dict[str, Version]:
    """The version ``lock`` installs of each package in ``environment``."""
    chosen: dict[str, Version] = {}
    for name, version, marker, _hashes in pins(lock):
        if marker is None or marker.evaluate(environment):
            assert name not in chosen, f"{lock.name} pins {name} twice for {environment}"
            chosen[name] = version
    return chosen


def requirements(*extras: str) -> list[Requirement]:
    project = PYPROJECT["project"]
    declared = list(project["dependencies"])
    for extra in extras:
        declared += project["optional-dependencies"][extra]
    build = [line for line in BUILD_IN.read_text(encoding="utf-8").splitlines() if line and not line.startswith("#")]
    return [Requirement(text) for text in declared + build]


def test_every_pin_has_hashes() -> None:
    for lock in (RUNTIME_LOCK, DEV_LOCK):
        entries = pins(lock)
        assert entries, f"{lock.name} pins nothing"
        unhashed = [name for name, _version, _marker, hashes in entries if not hashes]
        assert not unhashed, f"{lock.name}: pins without --hash (pip's hash-checking mode refuses them): {unhashed}"


def test_every_declared_dependency_is_locked_inside_its_range() -> None:
    for lock, extras in ((RUNTIME_LOCK, ()), (DEV_LOCK, ("dev",))):
        for environment in ENVIRONMENTS:
            chosen = resolved(lock, environment)
            for requirement in requirements(*extras):
                if requirement.marker and not requirement.marker.evaluate(environment):
                    continue
                name = canonicalize_name(requirement.name)
                assert name in chosen, f"{requirement} is not in {lock.name}: run `make lock`"
                assert requirement.specifier.contains(chosen[name], prereleases=True), (
                    f"{lock.name} pins {name}=={chosen[name]}, outside pyproject.toml's {requirement}: run `make lock`"
                )


def test_the_runtime_lock_is_the_dev_lock_without_the_dev_tools() -> None:
    for environment in ENVIRONMENTS:
        runtime, dev = resolved(RUNTIME_LOCK, environment), resolved(DEV_LOCK, environment)
        differ = {name: (version, dev.get(name)) for name, version in runtime.items() if dev.get(name) != version}
        assert not differ, f"runtime.txt and dev.txt disagree (runtime, dev): {differ}: run `make lock`"
        tools = {"pytest", "mypy", "ruff", "playwright", "schemathesis", "matplotlib", "uv"}
        assert not tools & runtime.keys(), f"dev tools in the runtime lock: {tools & runtime.keys()}"


def test_every_install_goes_through_the_lock() -> None:
    """The README's first command, the test command's venv and the image install from the lock, hash-checked."""
    readme_first = (ROOT / "README.md").read_text(encoding="utf-8").split("```sh\n", 1)[1].splitlines()[0]
    assert "--require-hashes -r requirements/runtime.txt" in readme_first, readme_first
    assert "--no-deps" in readme_first, "the project itself must not resolve dependencies outside the lock"
    venv = (ROOT / "scripts" / "venv.sh").read_text(encoding="utf-8")
    assert "--require-hashes" in venv and "--no-deps --no-build-isolation -e ." in venv
    assert "bash scripts/venv.sh" in (ROOT / "scripts" / "test.sh").read_text(encoding="utf-8")
    dockerfile = (ROOT / "Dockerfile").read_text(encoding="utf-8")
    assert "pip install --require-hashes -r requirements/runtime.txt" in dockerfile
    assert "pip install --no-deps --no-build-isolation ." in dockerfile
    for place in ("README.md", "Makefile", "scripts/test.sh", "Dockerfile"):
        text = (ROOT / place).read_text(encoding="utf-8")
        around = re.search(r"pip install (-q )?(-e )?'?\.(\[dev\])?'?(\s|$)", text)
        assert not around, f"{place} installs around the lock: {around}"


def test_no_test_installs_software() -> None:
    """System packages belong to the test command's setup step (`stack up`, `stack tools`), not to a test."""
    installers = re.compile(r"\b(ensure_binaries|apt_install|tools\.install)\(|[\"']apt-get[\"']")
    offenders = [
        f"{path.relative_to(ROOT)}:{number}"
        for path in sorted((ROOT / "tests").rglob("*.py"))
        if path.name != "test_lock.py"
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
        if installers.search(line)
    ]
    assert not offenders, f"tests that install software: {offenders}"
