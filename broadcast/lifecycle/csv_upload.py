"""Recipient lists uploaded as CSV: one user id per line, read line by line from a (spooled) binary file.

Format: the user id is the first column; an optional header row (first non-blank line) whose first cell is
``userId``, ``user_id`` or ``id`` (any case) is skipped; blank lines are skipped; ``\\n`` or ``\\r\\n`` end a
line (a ``\\r`` inside an id is refused as non-printable); UTF-8, a leading BOM tolerated. Cells are stripped
of surrounding spaces; trailing empty cells (``alice,``) are fine, a second non-empty cell is not. Repeated
ids collapse (first occurrence keeps its place) and are counted.

All or nothing: any invalid line rejects the upload (``CsvRejected`` with the first ``MAX_REPORTED_ERRORS``
line errors and the total), so a half-valid list is never broadcast. Memory stays bounded by the distinct
ids plus one line of at most ``MAX_LINE_CHARS``.

The server reads an upload on its event loop (``read_recipients``), handing it back every ``LOOP_SLICE``
lines, not in a thread: a thread parsing a million lines held the GIL against the loop (each of the loop's
system calls waited up to a switch interval to get it back), and URGENT POSTs answered during the parse
took up to 1.9 s. ``parse_recipients`` is the same reading, blocking, for scripts and tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import io
import re
from collections.abc import Generator, Iterator
from dataclasses import dataclass
from typing import IO

from broadcast.core.domain import is_user_id
from broadcast.errors import ValidationError
from broadcast.observability.loops import LOOP_SLICE

HEADER_NAMES = frozenset({"userid", "user_id", "id"})
MAX_REPORTED_ERRORS = 100
MAX_LINE_CHARS = 4096
_READ_LIMIT = MAX_LINE_CHARS + 2  # room for a "\r\n" terminator
_UNDECODABLE = re.compile("[\udc80-\udcff]")  # bytes that were not UTF-8, kept by "surrogateescape"


@dataclass(frozen=True, slots=True)
class LineError:
    """Why one line (1-based, counting every line of the file) was refused."""

    line: int
    error: str


@dataclass(frozen=True, slots=True)
class Recipients:
    """The distinct ids of a valid upload in file order, and how many repeated rows collapsed into them."""

    ids: tuple[str, ...]
    duplicates: int

    @property
    def accepted(self) -> int:
        return len(self.ids)


class CsvRejected(ValidationError):
    """At least one line is invalid; nothing of the upload may be used."""

    def __init__(self, errors: list[LineError], invalid_lines: int) -> None:
        first = errors[0] if errors else None
        where = f" (first: line {first.line}: {first.error})" if first else ""
        super().__init__(f"{invalid_lines} invalid line(s) in the CSV upload{where}")
        self.errors = errors
        self.invalid_lines = invalid_lines


class CsvTooManyRows(ValidationError):
    """The upload holds more recipient rows than allowed (reading stopped at the first row over)."""

    def __init__(self, max_rows: int) -> None:
        super().__init__(f"the CSV holds more than {max_rows} recipient rows")
        self.max_rows = max_rows


def _next_line(text: io.TextIOWrapper) -> tuple[str | None, bool]:
    """The next line without its terminator (None at the end), and whether it was too long to keep."""
    line = text.readline(_READ_LIMIT)
    if not line:
        return None, False
    if line.endswith("\n") or len(line) < _READ_LIMIT:
        content = line.removesuffix("\n").removesuffix("\r")
        return content, len(content) > MAX_LINE_CHARS
    while line and not line.endswith("\n"):  # skip the rest of an overlong line without holding it
        line = text.readline(_READ_LIMIT)
    return "", True


def _cells(line: str) -> tuple[str | None, list[str]]:
    """A line's cells, stripped; the ``csv`` module only when quoting makes a plain split wrong."""
    if '"' not in line:
        return None, [cell.strip() for cell in line.split(",")]
    try:
        return None, [cell.strip() for cell in next(csv.reader([line], strict=True))]
    except csv.Error as exc:
        return f"malformed CSV: {exc}", []


def _check(cells: list[str], max_id_chars: int) -> str | None:
    """The error of a data row, or None when its first cell is a valid user id."""
    if sum(1 for cell in cells if cell) > 1:
        return "more than one column: only the user id is expected"
    user_id = cells[0] if cells else ""
    if not user_id:
        return "empty user id"
    if len(user_id) > max_id_chars:
        return f"user id longer than {max_id_chars} characters"
    if not is_user_id(user_id, max_id_chars):
        return "user id contains non-printable characters"
    return None


def parse_recipients(source: IO[bytes], *, max_rows: int, max_id_chars: int) -> Recipients:
    """Read and validate every line of ``source``; raises ``CsvRejected`` or ``CsvTooManyRows``."""
    with _reading(source, max_rows, max_id_chars) as steps:
        while (read := _advance(steps)) is None:
            pass
        return read


async def read_recipients(source: IO[bytes], *, max_rows: int, max_id_chars: int) -> Recipients:
    """``parse_recipients`` on the event loop, handing it back every ``LOOP_SLICE`` lines."""
    with _reading(source, max_rows, max_id_chars) as steps:
        while True:
            if (read := _advance(steps)) is not None:
                return read
            await asyncio.sleep(0)  # a turn for the requests waiting, not a wait for anything


@contextlib.contextmanager
def _reading(source: IO[bytes], max_rows: int, max_id_chars: int) -> Iterator[Generator[None, None, Recipients]]:
    text = io.TextIOWrapper(source, encoding="utf-8-sig", errors="surrogateescape", newline="\n")
    try:
        yield _parse(text, max_rows, max_id_chars)
    finally:
        text.detach()  # the caller owns (and closes) the binary file


def _advance(steps: Generator[None, None, Recipients]) -> Recipients | None:
    """One slice of the reading: the recipients once it is done, None while lines are left."""
    try:
        next(steps)
    except StopIteration as done:
        read: Recipients = done.value
        return read
    return None


def _parse(text: io.TextIOWrapper, max_rows: int, max_id_chars: int) -> Generator[None, None, Recipients]:
    """The reading, as steps of ``LOOP_SLICE`` lines (it yields between two); returns the recipients."""
    seen: dict[str, None] = {}
    errors: list[LineError] = []
    invalid = rows = number = 0
    first_content_line = True
    while True:
        line, overlong = _next_line(text)
        if line is None:
            break
        number += 1
        if number % LOOP_SLICE == 0:
            yield
        if overlong:
            error: str | None = f"line longer than {MAX_LINE_CHARS} characters"
            cells: list[str] = []
        elif not line.strip():
            continue
        elif _UNDECODABLE.search(line):
            error, cells = "not valid UTF-8", []
        else:
            error, cells = _cells(line)
        if first_content_line:
            first_content_line = False
            if error is None and cells and cells[0].lower() in HEADER_NAMES:
                continue
        rows += 1
        if rows > max_rows:
            raise CsvTooManyRows(max_rows)
        error = error or _check(cells, max_id_chars)
        if error is not None:
            invalid += 1
            if len(errors) < MAX_REPORTED_ERRORS:
                errors.append(LineError(number, error))
            continue
        if cells[0] in seen:
            continue
        seen[cells[0]] = None
    if invalid:
        raise CsvRejected(errors, invalid)
    return Recipients(tuple(seen), rows - len(seen))
