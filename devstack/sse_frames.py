"""Server-Sent Events as a client reads them, for the test suite and the benchmark (one parser for both).

Follows the WHATWG "event stream interpretation" rules that matter to our clients: lines end with CRLF, LF or
CR; a blank line ends a frame; ``field: value`` (one optional space after the colon); ``data`` lines join with
``\\n``; a line starting with ``:`` is a comment (our heartbeats); a line without a colon is a field with an
empty value (so a chunked-encoding size line read raw, such as ``d``, is an unknown field and ignored).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Frame:
    """One frame: ``event`` is None for an unnamed one (and for a comment-only frame: ``comment`` is True)."""

    event: str | None = None
    id: str | None = None
    data: str | None = None
    retry_ms: int | None = None
    comment: bool = False


def parse_frame(block: bytes | str) -> Frame:
    """The fields of one frame (the text between two blank lines)."""
    text = block.decode() if isinstance(block, bytes) else block
    event = event_id = retry = None
    data: list[str] = []
    comment = False
    for line in text.replace("\r\n", "\n").replace("\r", "\n").split("\n"):
        if line.startswith(":"):
            comment = True
            continue
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "event":
            event = value
        elif name == "data":
            data.append(value)
        elif name == "id":
            event_id = value
        elif name == "retry" and value.isdigit():
            retry = int(value)
    return Frame(event, event_id, "\n".join(data) if data else None, retry, comment)


class FrameReader:
    """Frames from a stream's bytes as they arrive: ``feed`` returns the frames completed so far and keeps the
    unfinished rest (a CR at the end of a piece waits: its LF may come next)."""

    def __init__(self) -> None:
        self._rest = b""

    def feed(self, piece: bytes) -> list[Frame]:
        text = self._rest + piece
        if b"\r" in text:
            tail_cr = text.endswith(b"\r")
            text = (text[:-1] if tail_cr else text).replace(b"\r\n", b"\n").replace(b"\r", b"\n")
            text += b"\r" if tail_cr else b""
        *blocks, self._rest = text.split(b"\n\n")
        return [parse_frame(block) for block in blocks if block]
