"""The benchmark's peer (Centrifugo) and the client program it shares with ours: the connect URL and token,
the configuration, the absent toolchain, and the clients' receipt of a burst of markers."""

from __future__ import annotations

import json
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import jwt
import pytest

from bench.loadgen import Stream, Target, Worker
from bench.peers import centrifugo
from bench.scenarios import connections
from bench.scenarios.burst import _busy_s


def test_a_client_url_carries_the_connect_command_with_a_token_for_the_shared_channel() -> None:
    access = centrifugo.Access("s3cret" * 6)
    url = urlsplit(access.path("u42"))
    assert url.path == "/connection/uni_sse"
    connect = json.loads(parse_qs(url.query)["cf_connect"][0])
    claims = jwt.decode(connect["token"], access.hmac_secret, algorithms=["HS256"])
    assert claims["sub"] == "u42" and claims["channels"] == ["news"] and claims["exp"] > 0


def test_the_config_is_memory_engine_uni_sse_hmac_tokens_and_an_api_key_on_loopback() -> None:
    config = centrifugo.config(18000, "hmac", "key")
    assert config["engine"] == {"type": "memory"} and config["uni_sse"] == {"enabled": True}
    assert config["client"]["token"]["hmac_secret_key"] == "hmac" and config["http_api"]["key"] == "key"
    assert config["http_server"] == {"address": "127.0.0.1", "port": 18000}
    assert config["usage_stats"] == {"disabled": True}


def test_without_go_the_peer_is_left_out_with_a_line_saying_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("BROADCAST_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(centrifugo, "GO", tmp_path / "no-go")
    monkeypatch.setattr(centrifugo, "_binary", {})
    assert connections.variants() == ["ours", "baseline"]
    assert "no Go toolchain" in capsys.readouterr().out
    with pytest.raises(centrifugo.PeerUnavailable):
        centrifugo.Centrifugo(tmp_path)


class _Transport:
    def write(self, data: bytes) -> None:
        pass

    def is_closing(self) -> bool:
        return True


async def test_a_stream_times_each_marker_of_a_burst_once_even_when_split_over_reads() -> None:
    worker = Worker(Target("127.0.0.1", 1, "", centrifugo.READY, bearer=False))
    stream = Stream(worker, b"GET", None)  # type: ignore[arg-type]  # no connect waiter here
    stream.connection_made(_Transport())  # type: ignore[arg-type]
    stream.data_received(b'HTTP/1.1 200 OK\r\n\r\ndata: {"connect":{}}\n\n')
    assert stream.ready
    worker.streams.append(stream)
    worker.arm([b"tag#00", b"tag#01"])
    stream.data_received(b'data: {"channel":"news","pub":{"data":{"content":"tag#01 x"}}}\n\ndata: {"pub": "ta')
    stream.data_received(b'g#00 y"}\n\ndata: {"pub": "tag#01 again"}\n\n')
    result = await worker.collect(1.0)
    assert [len(times) for times in result["by_marker"]] == [1, 1] and result["missing"] == 0
    assert result["by_marker"][1][0] <= result["by_marker"][0][0] and len(result["times"]) == 2


def test_busy_time_is_the_union_of_each_broadcasts_delivery_window() -> None:
    assert _busy_s([[0.0, 1.0], [2.0, 3.0]]) == 2.0
    assert _busy_s([[0.0, 2.0], [1.0, 3.0]]) == 3.0
    assert _busy_s([[0.0, 5.0], [1.0, 3.0], []]) == 5.0
