// broadcast-client.js — a small, dependency-free client for the broadcast server.
//
//   const client = new BroadcastClient({ token: () => localStorage.getItem("broadcast.token") });
//   client.on("message", (m) => …);         // each broadcast once (deduplicated by broadcastId)
//   client.on("removed", ({broadcastId}) => …);
//   client.on("read", ({broadcastId}) => …); // read in another tab
//   client.on("resync", ({reason}) => …);    // the stream cannot send everything you missed: refetch the inbox
//                                            // (an unknown Last-Event-ID, or more than a connect sends: the
//                                            // newest SSE__REPLAY_LIMIT (1,000) messages / SSE__REPLAY_BYTES
//                                            // (1 MiB) follow the RESYNC; GET /api/user/messages has the rest)
//   client.on("state", (s) => …);            // "connecting" | "open" | "reconnecting" | "closed"
//   client.connect();
//   await client.api("GET", "/api/user/messages");
//
// Streams are opened with a single-use ticket (EventSource cannot send an Authorization header). A ticket
// cannot be replayed, so the browser's own retry would be refused: on any stream error this client closes
// the EventSource and opens a new one with a fresh ticket and `lastEventId` = the last event id the browser
// reported, after the server's `retry:` hint (3 s) or sooner when the browser comes back online.
// Retries are spread: each waits between half and all of `retryMs` × 2^(failures in a row), at most
// `maxRetryMs` (60 s), so the tabs of a restarted server or a dropped network do not come back in one
// wave; a refusal that says when to come back (`Retry-After`) is followed. An open stream resets the count.
(function (global) {
  "use strict";

  class BroadcastError extends Error {
    constructor(status, problem, retryAfterS) {
      super((problem && (problem.detail || problem.title)) || "HTTP " + status);
      this.status = status;
      this.problem = problem;
      this.retryAfterS = retryAfterS; // the server's Retry-After in seconds, or null
    }
  }

  class BroadcastClient {
    constructor(options) {
      const opts = options || {};
      this.baseUrl = opts.baseUrl || "";
      this.token = opts.token || (() => null);
      this.retryMs = opts.retryMs || 3000;
      this.maxRetryMs = opts.maxRetryMs || 60000;
      this.failures = 0; // attempts in a row that did not open a stream
      this.handlers = {};
      this.seen = new Set();
      this.lastEventId = null;
      this.source = null;
      this.timer = null;
      this.stopped = true;
      this.state = "closed";
      this.generation = 0; // each open attempt; a stale attempt (superseded while fetching its ticket) gives up
      this._online = () => this._reconnect(0);
      this._offline = () => this._drop();
    }

    on(name, handler) {
      (this.handlers[name] = this.handlers[name] || []).push(handler);
      return this;
    }

    _emit(name, value) {
      for (const handler of this.handlers[name] || []) {
        try {
          handler(value);
        } catch (err) {
          console.error("broadcast-client handler failed", err);
        }
      }
    }

    _setState(state) {
      if (this.state !== state) {
        this.state = state;
        this._emit("state", state);
      }
    }

    async api(method, path, body) {
      const headers = { Accept: "application/json" };
      const token = this.token();
      if (token) headers.Authorization = "Bearer " + token;
      const init = { method, headers };
      if (body instanceof FormData) {
        init.body = body;
      } else if (body !== undefined) {
        headers["Content-Type"] = "application/json";
        init.body = JSON.stringify(body);
      }
      const response = await fetch(this.baseUrl + path, init);
      const text = await response.text();
      const data = text ? JSON.parse(text) : null;
      if (!response.ok) {
        const retryAfter = Number(response.headers.get("Retry-After"));
        throw new BroadcastError(response.status, data, retryAfter > 0 ? retryAfter : null);
      }
      return data;
    }

    inbox(cursor) {
      return this.api("GET", "/api/user/messages" + (cursor ? "?cursor=" + encodeURIComponent(cursor) : ""));
    }

    markRead(broadcastIds) {
      return this.api("POST", "/api/user/messages/read", { broadcastIds });
    }

    /** Broadcasts the page already shows (from the inbox): the stream's copies of them are not emitted. */
    remember(broadcastIds) {
      for (const id of broadcastIds) this.seen.add(id);
    }

    connect() {
      this.stopped = false;
      global.addEventListener("online", this._online);
      global.addEventListener("offline", this._offline);
      this._open();
    }

    close() {
      this.stopped = true;
      this.generation++;
      global.removeEventListener("online", this._online);
      global.removeEventListener("offline", this._offline);
      clearTimeout(this.timer);
      this._drop();
      this._setState("closed");
    }

    _drop() {
      if (this.source) {
        this.source.close();
        this.source = null;
      }
      if (!this.stopped) this._setState("reconnecting");
    }

    /** The next retry's delay: exponential in the failures in a row, capped, with equal jitter. */
    _backoff() {
      const ceiling = Math.min(this.maxRetryMs, this.retryMs * 2 ** Math.min(this.failures, 16));
      this.failures++;
      return ceiling / 2 + Math.random() * (ceiling / 2);
    }

    _reconnect(delayMs) {
      if (this.stopped) return;
      clearTimeout(this.timer);
      this.timer = setTimeout(() => this._open(), delayMs);
    }

    async _open() {
      if (this.stopped) return;
      clearTimeout(this.timer);
      const generation = ++this.generation;
      this._drop();
      this._setState(this.lastEventId === null ? "connecting" : "reconnecting");
      let ticket;
      try {
        ticket = await this.api("POST", "/api/user/sse/ticket");
      } catch (err) {
        if (generation !== this.generation) return;
        if (err.status === 401) {
          this._emit("unauthorized", err);
          this._setState("closed");
          return;
        }
        this._reconnect(err.retryAfterS ? err.retryAfterS * 1000 : this._backoff());
        return;
      }
      if (this.stopped || generation !== this.generation) return;
      let url = this.baseUrl + ticket.streamUrl;
      if (this.lastEventId) url += "&lastEventId=" + encodeURIComponent(this.lastEventId);
      const source = new EventSource(url);
      this.source = source;
      const track = (event) => {
        if (event.lastEventId) this.lastEventId = event.lastEventId;
      };
      const parsed = (event) => {
        if (this.source !== source) return null; // a superseded stream: ignore whatever it still says
        track(event);
        try {
          return JSON.parse(event.data);
        } catch (err) {
          return null;
        }
      };
      source.addEventListener("CONNECTED", (event) => {
        const hello = parsed(event);
        if (!hello) return;
        this.failures = 0;
        this._setState("open");
        this._emit("connected", hello);
      });
      source.addEventListener("MESSAGE", (event) => {
        const message = parsed(event);
        if (!message || this.seen.has(message.broadcastId)) return;
        this.seen.add(message.broadcastId);
        this._emit("message", message);
      });
      const relay = (name, emitted) =>
        source.addEventListener(name, (event) => {
          const data = parsed(event);
          if (data) this._emit(emitted, data);
        });
      relay("READ_RECEIPT", "read");
      relay("MESSAGE_REMOVED", "removed");
      relay("RESYNC", "resync");
      source.addEventListener("CONNECTION_LIMIT_REACHED", (event) => {
        const data = parsed(event);
        if (!data) return;
        this._emit("limit", data);
        this._drop();
        this._reconnect(60000);
      });
      for (const name of ["SERVER_SHUTDOWN", "TOKEN_EXPIRED"]) {
        source.addEventListener(name, (event) => {
          const data = parsed(event);
          if (!data) return;
          this._emit(name === "TOKEN_EXPIRED" ? "expired" : "shutdown", data);
          this._drop();
          this._reconnect(name === "TOKEN_EXPIRED" ? 0 : this._backoff());
        });
      }
      source.onerror = () => {
        if (this.source !== source) return;
        this._drop();
        this._reconnect(navigator.onLine === false ? this.maxRetryMs : this._backoff());
      };
    }
  }

  global.BroadcastClient = BroadcastClient;
  global.BroadcastError = BroadcastError;
})(window);
