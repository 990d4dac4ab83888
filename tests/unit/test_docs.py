"""A clone carries its own design: every Markdown page the repository's docs and code point at is in the
repository, and nothing points outside it (the team's ``../shared`` pages are not part of a clone)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SOURCES = ["README.md", "ARCHITECTURE.md", "docs", "broadcast", "consumers", "sse", "dlt", "devstack", "bench"]
_OUTSIDE = re.compile(r"\.\./shared|/work/shared")
_PAGE = re.compile(r"(?<![\w/.-])((?:docs/)?[A-Z][A-Z_]+\.md)\b")


def texts() -> list[Path]:
    files: list[Path] = []
    for name in SOURCES:
        path = ROOT / name
        files += [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.suffix in {".md", ".py"})
    return files


def test_nothing_points_outside_the_repository() -> None:
    outside = [
        f"{path.relative_to(ROOT)}:{number}"
        for path in texts()
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
        if _OUTSIDE.search(line)
    ]
    assert not outside, f"references to pages a clone does not have: {outside}"


def test_every_page_named_is_in_the_repository() -> None:
    missing = set()
    for path in texts():
        for page in _PAGE.findall(path.read_text(encoding="utf-8")):
            here = (path.parent / page) if path.parent.name == "docs" else None
            if not (ROOT / page).is_file() and not (ROOT / "docs" / page).is_file() and not (here and here.is_file()):
                missing.add(f"{path.relative_to(ROOT)} -> {page}")
    assert not missing, f"pages named but not in the repository: {sorted(missing)}"
