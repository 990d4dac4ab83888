"""``devstack.sse_frames``: the one SSE parser the tests and the benchmark read streams with."""

from __future__ import annotations

from devstack.sse_frames import Frame, FrameReader, parse_frame


def test_a_frame_has_its_fields_and_joins_data_lines() -> None:
    frame = parse_frame(b'event: MESSAGE\nid: 7-x\ndata: {"a":\ndata:1}\nretry: 1500\n')
    assert frame == Frame("MESSAGE", "7-x", '{"a":\n1}', 1500, comment=False)


def test_one_space_after_the_colon_is_dropped_and_no_more() -> None:
    assert parse_frame("data:  two\n").data == " two"
    assert parse_frame("data:none").data == "none"


def test_a_comment_is_a_heartbeat_and_unknown_lines_are_ignored() -> None:
    assert parse_frame(": ping").comment
    frame = parse_frame("1a\r\nevent: CONNECTED\r\nretry: soon\r\ndata: {}\r\n")  # a raw chunk-size line
    assert frame == Frame("CONNECTED", None, "{}", None, comment=False)


def test_frames_split_anywhere_across_pieces_and_any_line_ending() -> None:
    stream = b"event: A\r\ndata: 1\r\n\r\n: beat\n\nevent: B\rdata: 2\r\revent: C\ndata: 3\n\nevent: D\ndata: 4"
    for size in range(1, len(stream) + 1):
        reader = FrameReader()
        frames = [f for i in range(0, len(stream), size) for f in reader.feed(stream[i : i + size])]
        assert [(f.event, f.data, f.comment) for f in frames] == [
            ("A", "1", False),
            (None, None, True),
            ("B", "2", False),
            ("C", "3", False),
        ], size  # D is not finished: it waits for its blank line
