"""Centrifugo v6.9.1 as a peer: installed once with ``go install``, one process per ``Centrifugo``.

- install: ``go install github.com/centrifugal/centrifugo/v6@v6.9.1`` (with the release build's
  ``-ldflags``: stripped, version 6.9.1) into ``<cache>/centrifugo-6.9.1`` (``devstack.paths.cache_dir()``),
  with its GOPATH, module and build caches under ``<cache>/go``; the binary is reused when present. No Go,
  or a failed build: ``binary()`` prints why and returns None, and the scenarios leave the peer column empty.
- config (JSON, v6 layout): memory engine, unidirectional SSE (``uni_sse``) on, connection JWTs checked with
  an HS256 HMAC secret, the HTTP API behind an API key, the health endpoint on, usage statistics off,
  warnings only in the log, listening on 127.0.0.1 on a free port.
- clients: ``GET /connection/uni_sse?cf_connect=<url-encoded {"token": JWT}>``; the JWT (``sub`` = the
  user, ``exp`` in a day, ``channels`` = [``news``]) subscribes the connection server-side to the one
  channel everybody gets, so no client-side subscribe exists. The stream's first event is the ``connect``
  push (``data: {"connect":{…,"subs":{"news":{…}}}}``); each publication is one ``data: {"channel":"news",
  "pub":{"data":{…}}}`` frame.
- publish: ``POST /api/publish`` with ``X-API-Key``, ``{"channel": "news", "data": {"content": …}}``.
  Centrifugo has no record of when a publication entered it: latencies start at the publisher's own clock
  just before its HTTP publish, as for the baseline.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import jwt

from bench.servers import stop_process
from devstack.paths import cache_dir
from devstack.servers import free_port

VERSION = "6.9.1"
MODULE = f"github.com/centrifugal/centrifugo/v6@v{VERSION}"
CHANNEL = "news"  # the channel every connection is subscribed to through its token
# as its release builds: stripped, and the version it reports (a bare ``go install`` says 0.0.0, "development")
LDFLAGS = f"-s -w -X github.com/centrifugal/centrifugo/v6/internal/build.Version={VERSION}"
UNI_SSE = "/connection/uni_sse"
READY = b'{"connect":'  # the first event of a uni_sse stream
GO = Path("/usr/local/go/bin/go")  # where the official tarball puts it, when it is not on PATH
INSTALL_TIMEOUT_S = 1_200.0
_binary: dict[str, Path | None] = {}  # one install attempt per process


def binary() -> Path | None:
    """The centrifugo binary, built on first use; None (and a line saying why) when it cannot be had."""
    if "path" not in _binary:
        _binary["path"] = _install()
    return _binary["path"]


def _install() -> Path | None:
    target = cache_dir() / f"centrifugo-{VERSION}"
    path = target / "centrifugo"
    if path.is_file() and os.access(path, os.X_OK):
        return path
    go = shutil.which("go") or (str(GO) if GO.is_file() else None)
    if go is None:
        print(f"centrifugo: no Go toolchain (go not on PATH nor at {GO}): peer column left empty")
        return None
    gopath = cache_dir() / "go"
    env = {
        **os.environ,
        "GOBIN": str(target),
        "GOPATH": str(gopath),
        "GOMODCACHE": str(gopath / "pkg" / "mod"),
        "GOCACHE": str(gopath / "cache"),
        "GOFLAGS": "-modcacherw",  # a cache the user can delete without chmod
    }
    print(f"centrifugo: building {MODULE} into {target} (once)", flush=True)
    try:
        done = subprocess.run(
            [go, "install", f"-ldflags={LDFLAGS}", MODULE],
            env=env,
            capture_output=True,
            text=True,
            timeout=INSTALL_TIMEOUT_S,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        print(f"centrifugo: go install failed ({exc!r}): peer column left empty")
        return None
    if done.returncode != 0 or not path.is_file():
        print(f"centrifugo: go install failed (exit {done.returncode}): {done.stderr[-1000:]}; peer column left empty")
        return None
    return path


def config(port: int, hmac_secret: str, api_key: str) -> dict[str, Any]:
    """A Centrifugo v6 configuration: memory engine, uni_sse, HS256 connection tokens, HTTP API key."""
    return {
        "http_server": {"address": "127.0.0.1", "port": port},
        "log": {"level": "warn"},
        "engine": {"type": "memory"},
        "client": {"token": {"hmac_secret_key": hmac_secret}},
        "http_api": {"key": api_key},
        "uni_sse": {"enabled": True},
        "health": {"enabled": True},
        "usage_stats": {"disabled": True},
    }


@dataclass(frozen=True)
class Access:
    """What a client needs to open its stream (picklable: the load-generator processes mint the tokens)."""

    hmac_secret: str
    channel: str = CHANNEL

    def token(self, user: str) -> str:
        claims = {"sub": user, "exp": int(time.time()) + 86_400, "channels": [self.channel]}
        return jwt.encode(claims, self.hmac_secret, algorithm="HS256")

    def path(self, user: str) -> str:
        """The uni_sse request path of ``user``: the connect command (its token) in ``cf_connect``."""
        connect = json.dumps({"token": self.token(user)}, separators=(",", ":"))
        return f"{UNI_SSE}?cf_connect={quote(connect, safe='')}"


class Centrifugo:
    """One Centrifugo process on 127.0.0.1 (``base``, ``proc.pid``, ``publish_request``, ``stop()``)."""

    def __init__(self, scratch: Path, name: str = "centrifugo") -> None:
        path = binary()
        if path is None:
            raise PeerUnavailable("centrifugo is not installed")
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.access = Access(secrets.token_hex(32))
        self.api_key = secrets.token_hex(16)
        self.config = scratch / f"{name}-{self.port}.json"
        self.config.write_text(json.dumps(config(self.port, self.access.hmac_secret, self.api_key), indent=2))
        self.log = scratch / f"{name}-{self.port}.log"
        self._out = self.log.open("ab")
        self.proc = subprocess.Popen(
            [str(path), "--config", str(self.config)], cwd=scratch, stdout=self._out, stderr=subprocess.STDOUT
        )
        deadline = time.monotonic() + 30
        while True:
            if self.proc.poll() is not None:
                self._out.close()
                raise RuntimeError(f"centrifugo exited: {self.log.read_text()[-2000:]}")
            try:
                if httpx.get(self.base + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"centrifugo did not start: {self.log}")
            time.sleep(0.1)

    def publish_request(self, content: str) -> tuple[str, dict[str, str], dict[str, Any]]:
        """(URL, headers, JSON body) of one publication of ``content`` to the channel everybody is on."""
        body = {"channel": self.access.channel, "data": {"content": content}}
        return self.base + "/api/publish", {"X-API-Key": self.api_key}, body

    def stop(self) -> None:
        stop_process(self.proc)
        if not self._out.closed:
            self._out.close()


class PeerUnavailable(RuntimeError):
    """The peer cannot run on this machine (no Go, or its build failed); the bench goes on without it."""


def check(response: httpx.Response) -> None:
    """Raise unless the HTTP API answered a success (it answers errors as 200 ``{"error": …}`` too)."""
    response.raise_for_status()
    error = response.json().get("error")
    if error:
        raise RuntimeError(f"centrifugo publish failed: {error}")
