"""The CSV recipient parser: accepted shapes, every per-line error with its line number, and the limits."""

from __future__ import annotations

import asyncio
import io
import tempfile

import pytest

from broadcast.lifecycle.csv_upload import (
    MAX_LINE_CHARS,
    MAX_REPORTED_ERRORS,
    CsvRejected,
    CsvTooManyRows,
    LineError,
    Recipients,
    parse_recipients,
    read_recipients,
)
from broadcast.observability.loops import LOOP_SLICE


def parse(data: bytes, max_rows: int = 1_000, max_id_chars: int = 16) -> Recipients:
    return parse_recipients(io.BytesIO(data), max_rows=max_rows, max_id_chars=max_id_chars)


def rejected(data: bytes, max_id_chars: int = 16) -> CsvRejected:
    with pytest.raises(CsvRejected) as caught:
        parse(data, max_id_chars=max_id_chars)
    return caught.value


def test_plain_ids_without_header_keep_file_order() -> None:
    assert parse(b"carol\nalice\nbob\n") == Recipients(("carol", "alice", "bob"), 0)


@pytest.mark.parametrize("header", [b"userId", b"USER_ID", b"id", b"UserId,name"])
def test_a_header_row_is_skipped(header: bytes) -> None:
    assert parse(header + b"\nalice\nbob").ids == ("alice", "bob")


def test_a_header_name_after_the_first_row_is_an_id() -> None:
    assert parse(b"alice\nid\n").ids == ("alice", "id")


def test_crlf_bom_blank_lines_and_surrounding_spaces() -> None:
    data = b"\xef\xbb\xbfuserId\r\n\r\n  alice  \r\n\r\nbob\r\n   \r\ncarol,\r\n"
    assert parse(data) == Recipients(("alice", "bob", "carol"), 0)


def test_duplicates_collapse_and_are_counted() -> None:
    result = parse(b"a\nb\na\nc\nb\na\n")
    assert result.ids == ("a", "b", "c")
    assert result.duplicates == 3 and result.accepted == 3


def test_quoted_ids_are_unquoted() -> None:
    assert parse(b'"alice"\n"bob",\n').ids == ("alice", "bob")


def test_an_empty_file_has_no_recipients() -> None:
    assert parse(b"") == Recipients((), 0)
    assert parse(b"userId\r\n\r\n") == Recipients((), 0)


def test_each_invalid_line_is_reported_with_its_number() -> None:
    data = b"\n".join(
        [
            b"userId",  # 1 header
            b"alice",  # 2
            b"bob,extra",  # 3 two columns
            b",",  # 4 empty id
            b'""',  # 5 empty id
            b"x" * 17,  # 6 too long for max_id_chars=16
            b"tab\there",  # 7 non-printable
            b"caf\xe9",  # 8 latin-1, not UTF-8
            b"",  # 9 blank: skipped
            b'"unterminated',  # 10 broken quoting
            b"carol",  # 11
        ]
    )
    error = rejected(data)
    assert [e.line for e in error.errors] == [3, 4, 5, 6, 7, 8, 10]
    assert error.errors[:6] == [
        LineError(3, "more than one column: only the user id is expected"),
        LineError(4, "empty user id"),
        LineError(5, "empty user id"),
        LineError(6, "user id longer than 16 characters"),
        LineError(7, "user id contains non-printable characters"),
        LineError(8, "not valid UTF-8"),
    ]
    assert error.errors[6].error.startswith("malformed CSV")
    assert error.invalid_lines == 7
    assert "line 3" in str(error)


def test_a_bare_carriage_return_inside_an_id_is_refused() -> None:
    assert rejected(b"ali\rce\n").errors == [LineError(1, "user id contains non-printable characters")]


def test_an_overlong_line_is_one_error_and_numbering_continues() -> None:
    data = b"alice\n" + b"y" * (MAX_LINE_CHARS * 3) + b"\r\nbob\n" + b"z" * 20 + b"\n"
    assert rejected(data).errors == [
        LineError(2, f"line longer than {MAX_LINE_CHARS} characters"),
        LineError(4, "user id longer than 16 characters"),
    ]


def test_only_the_first_errors_are_listed_but_all_are_counted() -> None:
    error = rejected(b"a,b\n" * (MAX_REPORTED_ERRORS + 50))
    assert len(error.errors) == MAX_REPORTED_ERRORS
    assert error.errors[-1].line == MAX_REPORTED_ERRORS
    assert error.invalid_lines == MAX_REPORTED_ERRORS + 50


def test_rows_over_the_limit_stop_the_parse() -> None:
    assert parse(b"id\n" + b"u\n" * 10, max_rows=10).duplicates == 9  # header and exactly the limit: fine
    with pytest.raises(CsvTooManyRows, match="more than 10 recipient rows"):
        parse(b"id\n" + b"u\n" * 11, max_rows=10)


def test_reads_a_spooled_file_without_closing_it() -> None:
    with tempfile.SpooledTemporaryFile(max_size=64) as spooled:
        spooled.write(b"userId\n" + b"".join(f"user-{i}\n".encode() for i in range(100)))
        spooled.seek(0)
        result = parse_recipients(spooled, max_rows=1_000, max_id_chars=16)
        assert not spooled.closed
    assert result.accepted == 100 and result.ids[0] == "user-0" and result.ids[-1] == "user-99"


async def test_the_servers_reading_hands_the_event_loop_back_while_it_reads_and_finds_the_same() -> None:
    """A 1M-line upload parsed in a thread held the GIL against the event loop (URGENT POSTs waited up to
    1.9 s); the server now reads on the loop, letting other tasks run between slices of lines."""
    lines = 20 * LOOP_SLICE
    data = b"userId\n" + b"".join(f"user-{i % (lines - 5)}\n".encode() for i in range(lines))
    turns = 0

    async def other_requests() -> None:
        nonlocal turns
        while True:
            turns += 1
            await asyncio.sleep(0)

    ticker = asyncio.create_task(other_requests())
    await asyncio.sleep(0)
    before = turns
    try:
        read = await read_recipients(io.BytesIO(data), max_rows=lines, max_id_chars=16)
    finally:
        ticker.cancel()
    assert turns - before >= lines // LOOP_SLICE, "the loop ran other tasks between slices"
    assert read == parse_recipients(io.BytesIO(data), max_rows=lines, max_id_chars=16)
    assert (read.accepted, read.duplicates) == (lines - 5, 5)
    with pytest.raises(CsvTooManyRows):
        await read_recipients(io.BytesIO(data), max_rows=lines - 1, max_id_chars=16)
