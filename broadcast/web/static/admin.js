// admin.js — the admin console (/admin): sign-in, create broadcasts (JSON or CSV), list and cancel them with
// live stats, per-user deliveries, dead letters (summary, list, detail, redrive, purge), the fault drill and
// user roles.
//
// Served under a strict CSP: no inline code or styles, so every handler is attached here. Every piece of
// server data is rendered as text (textContent), never as HTML.
//
// Live data is refreshed by polling (broadcasts + stats every 2 s, dead letters every 3 s): simple and robust
// (no admin stream exists, and a poll that fails just shows a notice and tries again on the next tick).
// Tables are keyed (broadcast id, user id, letter id) and updated in place, so a button is never replaced
// under the pointer between two polls.
(function () {
  "use strict";

  const TOKEN_KEY = "broadcast.token";
  const USER_KEY = "broadcast.user";
  const BROADCASTS_POLL_MS = 2000;
  const DLT_POLL_MS = 3000;
  const PAGE_STEP = 50;
  const MAX_PAGE = 500; // the server's default limits.max_page_size
  const STATS_CONCURRENCY = 6;
  const FINISHED_STATS_EVERY_MS = 10000; // stats of a finished broadcast barely move: refreshed less often
  const LIVE_STATUSES = new Set(["ACTIVE", "SCHEDULED"]);
  const DRILL_PATH = "/api/admin/testing/kafka-consumer-failure";
  const CONTENT_PREVIEW = 140;

  const client = new BroadcastClient({ token: () => localStorage.getItem(TOKEN_KEY) });
  const anonymous = new BroadcastClient({ token: () => null });

  /** An answer that arrived after the user signed out or in again: dropped silently. */
  class StaleAnswer extends Error {}

  const state = {
    session: 0, // bumped at every sign-in / sign-out
    timers: {},
    broadcasts: { seq: 0, limit: PAGE_STEP, rows: new Map(), statsAt: new Map() },
    deliveries: { seq: 0, limit: PAGE_STEP, id: null, rows: new Map() },
    dlt: { seq: 0, limit: PAGE_STEP, rows: new Map(), detailId: null, topics: new Set(), exceptions: new Set() },
    drillEnabled: null, // null: not known yet; false after a 404
  };

  // ------------------------------------------------------------------------------------------ DOM helpers
  const $ = (id) => document.getElementById(id);

  /** A new element; ``props``: className, text, title, dataset, type; children: nodes or strings (as text). */
  function el(tag, props, ...children) {
    const node = document.createElement(tag);
    const p = props || {};
    if (p.className) node.className = p.className;
    if (p.text !== undefined && p.text !== null) node.textContent = String(p.text);
    if (p.title) node.title = p.title;
    if (p.type) node.type = p.type;
    Object.assign(node.dataset, p.dataset || {});
    for (const child of children) node.append(child);
    return node;
  }

  function show(node, visible) {
    node.classList.toggle("hidden", !visible);
  }

  /** Put ``text`` in ``node`` (as text) and show it; an empty text hides it. */
  function say(node, text) {
    node.textContent = text || "";
    show(node, Boolean(text));
  }

  /** Make ``node`` the ``index``-th child of ``parent``, moving it only when it is not there already. */
  function placeAt(parent, node, index) {
    if (parent.children[index] !== node) parent.insertBefore(node, parent.children[index] || null);
  }

  function formatTime(iso) {
    if (!iso) return "—";
    const date = new Date(iso);
    return Number.isNaN(date.getTime()) ? String(iso) : date.toLocaleString();
  }

  function truncate(text, max) {
    const value = String(text || "");
    return value.length > max ? value.slice(0, max - 1) + "…" : value;
  }

  /** "a, b c" -> ["a", "b", "c"] */
  function splitList(value) {
    return String(value || "")
      .split(/[\s,]+/)
      .filter(Boolean);
  }

  /** "?a=1&b=2" from the non-empty values of ``params`` ("" when none). */
  function query(params) {
    const search = new URLSearchParams();
    for (const [name, value] of Object.entries(params)) {
      if (value !== undefined && value !== null && value !== "") search.set(name, String(value));
    }
    const text = search.toString();
    return text ? "?" + text : "";
  }

  const path = (...parts) => parts.map((p, i) => (i === 0 ? p : encodeURIComponent(p))).join("/");

  // ------------------------------------------------------------------------------------------ errors
  function describeFieldError(e) {
    if (e && e.field !== undefined) return e.field + ": " + e.message;
    if (e && e.line !== undefined) return "line " + e.line + ": " + e.error;
    return JSON.stringify(e);
  }

  /** A readable text for any failure: the problem's detail and field errors, or what went wrong on the way. */
  function describe(err) {
    if (err && typeof err.status === "number") {
      const problem = err.problem || {};
      const lines = [(problem.detail || problem.title || "request failed") + " (HTTP " + err.status + ")"];
      for (const e of Array.isArray(problem.errors) ? problem.errors : []) lines.push("• " + describeFieldError(e));
      if (problem.invalidLines) lines.push(problem.invalidLines + " invalid line(s) in all");
      return lines.join("\n");
    }
    if (err instanceof SyntaxError) return "the server's answer is not JSON";
    return "network error: " + ((err && err.message) || String(err));
  }

  let flashTimer = null;

  /** A short message at the top of the page (errors stay longer). */
  function flash(text, isError) {
    const area = $("flash");
    area.replaceChildren(el("p", { className: isError ? "error" : "", text }));
    clearTimeout(flashTimer);
    flashTimer = setTimeout(() => area.replaceChildren(), isError ? 15000 : 6000);
  }

  /** Show a failure in ``node`` unless it belongs to an older session. */
  function fail(node, prefix, err) {
    if (err instanceof StaleAnswer) return;
    say(node, (prefix ? prefix + ": " : "") + describe(err));
  }

  // ------------------------------------------------------------------------------------------ API
  /** ``client.api`` that drops answers of an older session and signs out when the token is refused. */
  async function api(method, url, body) {
    const session = state.session;
    try {
      const answer = await client.api(method, url, body);
      if (session !== state.session) throw new StaleAnswer();
      return answer;
    } catch (err) {
      if (session !== state.session) throw new StaleAnswer();
      if (err && err.status === 401) {
        endSession("The server refused the token (expired or invalid): sign in again.");
        throw new StaleAnswer();
      }
      throw err;
    }
  }

  // ------------------------------------------------------------------------------------------ sign-in
  /** The claims of a JWT, read (not verified) to show who is signed in; {} when unreadable. */
  function claimsOf(token) {
    try {
      const part = token.split(".")[1].replace(/-/g, "+").replace(/_/g, "/");
      const bytes = Uint8Array.from(atob(part), (c) => c.charCodeAt(0));
      return JSON.parse(new TextDecoder().decode(bytes)) || {};
    } catch (err) {
      return {};
    }
  }

  function currentUser() {
    const token = localStorage.getItem(TOKEN_KEY);
    if (!token) return null;
    const claims = claimsOf(token);
    const roles = Array.isArray(claims.roles) ? claims.roles : splitList(claims.roles);
    const expired = typeof claims.exp === "number" && claims.exp * 1000 < Date.now();
    return { sub: localStorage.getItem(USER_KEY) || claims.sub || "(unknown user)", roles, expired };
  }

  function signIn(token, sub) {
    localStorage.setItem(TOKEN_KEY, token);
    localStorage.setItem(USER_KEY, sub);
    say($("signin-error"), "");
    applySession();
    flash("Signed in as " + sub);
  }

  /** Forget the stored token and say why. */
  function endSession(reason) {
    localStorage.removeItem(TOKEN_KEY);
    localStorage.removeItem(USER_KEY);
    applySession();
    say($("signin-error"), reason);
  }

  /** Show the console for the stored token (or hide it) and (re)start polling from a clean state. */
  function applySession() {
    state.session += 1;
    stopPolling();
    resetViews();
    let user = currentUser();
    if (user && user.expired) {
      localStorage.removeItem(TOKEN_KEY);
      localStorage.removeItem(USER_KEY);
      say($("signin-error"), "The stored token has expired: sign in again.");
      user = null;
    }
    $("whoami").textContent = user
      ? "Signed in as " + user.sub + (user.roles.length ? " (" + user.roles.join(", ") + ")" : "")
      : "not signed in";
    show($("signout"), Boolean(user));
    show($("app"), Boolean(user));
    show($("signed-out"), !user);
    if (user) startPolling();
  }

  async function loadDevStatus() {
    try {
      const status = await anonymous.api("GET", "/dev/status");
      show($("dev-form"), Boolean(status && status.devSignIn));
    } catch (err) {
      show($("dev-form"), false);
      say($("signin-error"), "Could not ask whether development sign-in is on: " + describe(err));
    }
  }

  async function devSignIn(event) {
    event.preventDefault();
    const sub = $("dev-user").value.trim();
    const roles = splitList($("dev-roles").value);
    const button = $("dev-signin");
    button.disabled = true;
    try {
      const answer = await anonymous.api("POST", "/dev/token", { sub, roles });
      signIn(answer.token, answer.sub);
    } catch (err) {
      say($("signin-error"), "Sign-in failed: " + describe(err));
    } finally {
      button.disabled = false;
    }
  }

  function useToken(event) {
    event.preventDefault();
    const token = $("token").value.trim().replace(/^Bearer\s+/i, "");
    if (!token) {
      say($("signin-error"), "Paste a token first.");
      return;
    }
    $("token").value = "";
    signIn(token, claimsOf(token).sub || "(token)");
  }

  function signOut() {
    localStorage.removeItem(TOKEN_KEY);
    localStorage.removeItem(USER_KEY);
    say($("signin-error"), "");
    applySession();
    flash("Signed out");
  }

  // ------------------------------------------------------------------------------------------ polling
  function startPolling() {
    poll("broadcasts", BROADCASTS_POLL_MS, () => Promise.all([refreshBroadcasts(), refreshDeliveries()]));
    poll("dlt", DLT_POLL_MS, () => Promise.all([refreshDlt(), refreshDrills()]));
  }

  /** Run ``task`` now and again ``ms`` after each run ends (never two at once), for this session only. */
  function poll(name, ms, task) {
    const session = state.session;
    const tick = async () => {
      try {
        await task();
      } catch (err) {
        // each task shows its own failures; nothing may stop the loop
      }
      if (session === state.session) state.timers[name] = setTimeout(tick, ms);
    };
    tick();
  }

  function stopPolling() {
    for (const timer of Object.values(state.timers)) clearTimeout(timer);
    state.timers = {};
  }

  function resetViews() {
    const b = state.broadcasts;
    b.rows.clear();
    b.statsAt.clear();
    b.limit = PAGE_STEP;
    $("broadcasts").tBodies[0].replaceChildren();
    closeDeliveries();
    const d = state.dlt;
    d.rows.clear();
    d.limit = PAGE_STEP;
    $("dlt-list").tBodies[0].replaceChildren();
    $("dlt-summary").replaceChildren();
    closeDetail();
    state.drillEnabled = null;
    show($("drill"), false);
    for (const id of ["broadcasts-error", "dlt-error", "dlt-result", "create-error", "create-result", "drill-error"]) {
      say($(id), "");
    }
  }

  // ------------------------------------------------------------------------------------------ create
  /** A datetime-local value as ISO-8601 with an offset (UTC), or undefined when empty. */
  function isoFromLocal(inputId, name) {
    const value = $(inputId).value;
    if (!value) return undefined;
    const date = new Date(value);
    if (Number.isNaN(date.getTime())) throw new Error(name + " is not a valid date and time");
    return date.toISOString();
  }

  function commonFields() {
    const fields = {
      content: $("content").value,
      priority: $("priority").value,
      fireAndForget: $("fire-and-forget").checked,
    };
    const category = $("category").value.trim();
    if (category) fields.category = category;
    const scheduledAt = isoFromLocal("scheduled-at", "Scheduled at");
    if (scheduledAt) fields.scheduledAt = scheduledAt;
    const expiresAt = isoFromLocal("expires-at", "Expires at");
    if (expiresAt) fields.expiresAt = expiresAt;
    return fields;
  }

  /** {url, body}: JSON for the audience fields, or multipart for the CSV endpoint when a file is chosen. */
  function createRequest() {
    const fields = commonFields();
    const file = $("csv-file").files[0];
    if (file) {
      const form = new FormData();
      form.append("file", file);
      for (const [name, value] of Object.entries(fields)) form.append(name, String(value));
      return { url: "/api/admin/broadcasts/csv", body: form };
    }
    const targetType = $("target-type").value;
    const body = Object.assign({ targetType }, fields);
    if (targetType !== "ALL") body.targetIds = splitList($("target-ids").value);
    return { url: "/api/admin/broadcasts", body };
  }

  function showCreated(created) {
    let text = "Created broadcast " + created.id + " (" + created.status + ")";
    if (created.recipients) {
      const r = created.recipients;
      text += ": " + r.accepted + " recipients accepted, " + r.duplicates + " duplicates";
    }
    say($("create-result"), text);
  }

  async function submitCreate(event) {
    event.preventDefault();
    say($("create-error"), "");
    say($("create-result"), "");
    let request;
    try {
      request = createRequest();
    } catch (err) {
      say($("create-error"), err.message);
      return;
    }
    const button = $("create");
    button.disabled = true;
    try {
      showCreated(await api("POST", request.url, request.body));
      $("content").value = "";
      $("csv-file").value = "";
      onFileChange();
      refreshBroadcasts();
    } catch (err) {
      fail($("create-error"), "Not created", err);
    } finally {
      button.disabled = false;
    }
  }

  function onTargetTypeChange() {
    const type = $("target-type").value;
    show($("target-ids-field"), type !== "ALL");
    $("target-ids-label").textContent = type === "ROLE" ? "Role names" : "User ids";
  }

  function onFileChange() {
    show($("csv-note"), $("csv-file").files.length > 0);
  }

  // ------------------------------------------------------------------------------------------ broadcasts
  function targetText(b) {
    if (b.targetType === "ROLE") return "ROLE: " + (b.targetRoles || []).join(", ");
    if (b.targetType === "SELECTED") return "SELECTED (" + b.targetedCount + ")";
    return b.targetType;
  }

  function broadcastDetails(b) {
    const parts = ["by " + b.senderId];
    if (b.category) parts.push("category " + b.category);
    if (b.scheduledAt) parts.push("scheduled " + formatTime(b.scheduledAt));
    if (b.expiresAt) parts.push("expires " + formatTime(b.expiresAt));
    if (b.fireAndForget) parts.push("fire and forget");
    return parts.join(" · ");
  }

  function newBroadcastRow(id) {
    const cells = {
      created: el("td", { className: "created" }),
      content: el("div", { className: "content" }),
      details: el("div", { className: "muted" }),
      target: el("td", { className: "target" }),
      priority: el("span", { className: "badge priority" }),
      status: el("span", { className: "badge status" }),
      stats: el("td", { className: "stats", text: "…" }),
      extra: el("td", { className: "stats-extra muted", text: "" }),
      cancel: el("button", { className: "cancel danger hidden", text: "Cancel", type: "button" }),
    };
    const deliveries = el("button", { className: "deliveries secondary", text: "Deliveries", type: "button" });
    const tr = el(
      "tr",
      { dataset: { id } },
      cells.created,
      el("td", {}, cells.content, cells.details),
      cells.target,
      el("td", {}, cells.priority),
      el("td", {}, cells.status),
      cells.stats,
      cells.extra,
      el("td", { className: "actions" }, cells.cancel, " ", deliveries)
    );
    return { tr, cells, status: null };
  }

  function updateBroadcastRow(row, b) {
    const c = row.cells;
    c.created.textContent = formatTime(b.createdAt);
    c.content.textContent = truncate(b.content, CONTENT_PREVIEW);
    c.content.title = b.content;
    c.details.textContent = broadcastDetails(b);
    c.target.textContent = targetText(b);
    c.priority.textContent = b.priority;
    c.priority.className = "badge priority " + b.priority;
    c.status.textContent = b.status;
    c.status.className = "badge status " + b.status;
    show(c.cancel, LIVE_STATUSES.has(b.status));
    row.status = b.status;
  }

  function renderBroadcasts(page) {
    const tbody = $("broadcasts").tBodies[0];
    const rows = state.broadcasts.rows;
    const seen = new Set();
    page.items.forEach((b, index) => {
      let row = rows.get(b.id);
      if (!row) {
        row = newBroadcastRow(b.id);
        rows.set(b.id, row);
      }
      updateBroadcastRow(row, b);
      placeAt(tbody, row.tr, index);
      seen.add(b.id);
    });
    for (const [id, row] of rows) {
      if (!seen.has(id)) {
        row.tr.remove();
        rows.delete(id);
      }
    }
    show($("broadcasts-empty"), page.items.length === 0);
    show($("broadcasts-more"), Boolean(page.nextCursor) && state.broadcasts.limit < MAX_PAGE);
  }

  async function refreshBroadcasts() {
    const b = state.broadcasts;
    const seq = ++b.seq;
    const params = query({ status: $("status-filter").value, limit: b.limit });
    let page;
    try {
      page = await api("GET", "/api/admin/broadcasts" + params);
    } catch (err) {
      if (seq === b.seq) fail($("broadcasts-error"), "Could not refresh the broadcasts (retrying)", err);
      return;
    }
    if (seq !== b.seq) return;
    renderBroadcasts(page);
    const failures = await refreshStats(page.items);
    if (seq !== b.seq) return;
    if (failures.length) {
      const what = "Could not refresh the stats of " + failures.length + " broadcast(s) (retrying)";
      fail($("broadcasts-error"), what, failures[0]);
    } else {
      say($("broadcasts-error"), "");
    }
  }

  /** Whether a row's stats are due: live broadcasts every poll, finished ones on a change and now and then. */
  function statsDue(b) {
    const last = state.broadcasts.statsAt.get(b.id);
    if (!last || LIVE_STATUSES.has(b.status) || last.status !== b.status) return true;
    return Date.now() - last.at > FINISHED_STATS_EVERY_MS;
  }

  /** Fetch the due stats (a few at a time) into their rows; the failures (errors) are returned. */
  async function refreshStats(items) {
    const queue = items.filter(statsDue);
    const failures = [];
    const worker = async () => {
      while (queue.length) {
        const b = queue.shift();
        try {
          const stats = await api("GET", path("/api/admin/broadcasts", b.id, "stats"));
          state.broadcasts.statsAt.set(b.id, { status: b.status, at: Date.now() });
          renderStats(b.id, stats);
        } catch (err) {
          if (err instanceof StaleAnswer) return;
          failures.push(err);
        }
      }
    };
    await Promise.all(Array.from({ length: Math.min(STATS_CONCURRENCY, queue.length) }, worker));
    return failures;
  }

  function percent(rate) {
    return typeof rate === "number" ? Math.round(rate * 1000) / 10 + "%" : "?";
  }

  function renderStats(id, s) {
    const row = state.broadcasts.rows.get(id);
    if (!row) return;
    row.cells.stats.textContent = s.targeted + " / " + s.delivered + " / " + s.read;
    row.cells.stats.title = "delivery rate " + percent(s.deliveryRate) + ", read rate " + percent(s.readRate);
    row.cells.extra.textContent = s.failed + " / " + s.pending;
  }

  async function cancelBroadcast(id, button) {
    button.disabled = true;
    try {
      const cancelled = await api("DELETE", path("/api/admin/broadcasts", id));
      flash("Cancelled broadcast " + cancelled.id);
    } catch (err) {
      if (!(err instanceof StaleAnswer)) flash("Could not cancel " + id + ": " + describe(err), true);
    } finally {
      button.disabled = false;
    }
    await refreshBroadcasts();
  }

  function onBroadcastsClick(event) {
    const button = event.target.closest("button");
    const tr = button && button.closest("tr[data-id]");
    if (!tr) return;
    if (button.classList.contains("cancel")) cancelBroadcast(tr.dataset.id, button);
    else if (button.classList.contains("deliveries")) openDeliveries(tr.dataset.id);
  }

  function showMoreBroadcasts() {
    state.broadcasts.limit = Math.min(state.broadcasts.limit + PAGE_STEP, MAX_PAGE);
    refreshBroadcasts();
  }

  // ------------------------------------------------------------------------------------------ deliveries
  function openDeliveries(id) {
    closeDeliveries();
    state.deliveries.id = id;
    $("deliveries-of").textContent = id;
    show($("deliveries"), true);
    refreshDeliveries();
    $("deliveries").scrollIntoView({ block: "nearest" });
  }

  function closeDeliveries() {
    const d = state.deliveries;
    d.id = null;
    d.seq += 1;
    d.limit = PAGE_STEP;
    d.rows.clear();
    $("deliveries-table").tBodies[0].replaceChildren();
    say($("deliveries-error"), "");
    show($("deliveries-empty"), false);
    show($("deliveries-more"), false);
    show($("deliveries"), false);
  }

  function newDeliveryRow(userId) {
    const cells = {
      delivery: el("span", { className: "badge delivery-status" }),
      read: el("span", { className: "badge read-status" }),
      deliveredAt: el("td", { className: "delivered-at" }),
      readAt: el("td", { className: "read-at" }),
    };
    const tr = el(
      "tr",
      { dataset: { user: userId } },
      el("td", { className: "user", text: userId }),
      el("td", {}, cells.delivery),
      el("td", {}, cells.read),
      cells.deliveredAt,
      cells.readAt
    );
    return { tr, cells };
  }

  function renderDeliveries(page) {
    const d = state.deliveries;
    const tbody = $("deliveries-table").tBodies[0];
    const seen = new Set();
    page.items.forEach((item, index) => {
      let row = d.rows.get(item.userId);
      if (!row) {
        row = newDeliveryRow(item.userId);
        d.rows.set(item.userId, row);
      }
      row.cells.delivery.textContent = item.deliveryStatus;
      row.cells.delivery.className = "badge delivery-status " + item.deliveryStatus;
      row.cells.read.textContent = item.readStatus;
      row.cells.read.className = "badge read-status " + item.readStatus;
      row.cells.deliveredAt.textContent = formatTime(item.deliveredAt);
      row.cells.readAt.textContent = formatTime(item.readAt);
      placeAt(tbody, row.tr, index);
      seen.add(item.userId);
    });
    for (const [userId, row] of d.rows) {
      if (!seen.has(userId)) {
        row.tr.remove();
        d.rows.delete(userId);
      }
    }
    show($("deliveries-empty"), page.items.length === 0);
    show($("deliveries-more"), Boolean(page.nextCursor) && d.limit < MAX_PAGE);
  }

  async function refreshDeliveries() {
    const d = state.deliveries;
    if (!d.id) return;
    const seq = ++d.seq;
    try {
      const page = await api("GET", path("/api/admin/broadcasts", d.id, "deliveries") + query({ limit: d.limit }));
      if (seq !== d.seq) return;
      renderDeliveries(page);
      say($("deliveries-error"), "");
    } catch (err) {
      if (seq === d.seq) fail($("deliveries-error"), "Could not refresh the deliveries (retrying)", err);
    }
  }

  function showMoreDeliveries() {
    state.deliveries.limit = Math.min(state.deliveries.limit + PAGE_STEP, MAX_PAGE);
    refreshDeliveries();
  }

  // ------------------------------------------------------------------------------------------ dead letters
  /** The DLT filters as query parameters (the same for the list, the summary and the bulk actions). */
  function dltFilters() {
    return {
      topic: $("dlt-topic").value.trim(),
      exception: $("dlt-exception").value.trim(),
      broadcastId: $("dlt-broadcast").value.trim(),
      status: $("dlt-status").value,
    };
  }

  /** Sum the summary's (topic, exception) groups by one of their fields: [[name, count], ...] largest first. */
  function countBy(groups, field) {
    const counts = new Map();
    for (const g of groups) {
      const name = g[field] || "(none)";
      counts.set(name, (counts.get(name) || 0) + g.count);
    }
    return [...counts.entries()].sort((a, b) => b[1] - a[1]);
  }

  function countTable(heading, entries, className) {
    const body = el("tbody");
    for (const [name, count] of entries) {
      const cells = [el("td", { text: name }), el("td", { className: "count", text: count })];
      body.append(el("tr", { dataset: { name } }, ...cells));
    }
    if (!entries.length) body.append(el("tr", {}, el("td", { className: "muted", text: "none" }), el("td")));
    const head = el("thead", {}, el("tr", {}, el("th", { text: heading }), el("th", { text: "Count" })));
    return el("table", { className }, head, body);
  }

  function fillDatalist(id, known, names) {
    let grew = false;
    for (const name of names) {
      if (name && !known.has(name)) {
        known.add(name);
        grew = true;
      }
    }
    if (grew) $(id).replaceChildren(...[...known].sort().map((name) => el("option", { text: name })));
  }

  function renderSummary(summary) {
    const groups = summary.groups || [];
    const byException = countBy(groups, "exceptionFqcn");
    const byTopic = countBy(groups, "originalTopic");
    $("dlt-summary").replaceChildren(
      el("p", { className: "muted", text: summary.total + " dead letter(s) match the filters" }),
      el(
        "div",
        { className: "row" },
        countTable("Exception", byException, "by-exception"),
        countTable("Topic", byTopic, "by-topic")
      )
    );
    fillDatalist("dlt-exceptions", state.dlt.exceptions, groups.map((g) => g.exceptionFqcn));
    fillDatalist("dlt-topics", state.dlt.topics, groups.map((g) => g.originalTopic));
  }

  function newLetterRow(id) {
    const cells = {
      received: el("td", { className: "received" }),
      topic: el("td", { className: "topic" }),
      exception: el("div", { className: "exception" }),
      message: el("div", { className: "muted" }),
      broadcast: el("td", { className: "broadcast" }),
      status: el("span", { className: "badge status" }),
    };
    const tr = el(
      "tr",
      { dataset: { letter: String(id) } },
      cells.received,
      cells.topic,
      el("td", {}, cells.exception, cells.message),
      cells.broadcast,
      el("td", {}, cells.status),
      el(
        "td",
        { className: "actions" },
        el("button", { className: "dlt-detail secondary", text: "Detail", type: "button" }),
        " ",
        el("button", { className: "dlt-redrive", text: "Redrive", type: "button" }),
        " ",
        el("button", { className: "dlt-purge danger", text: "Purge", type: "button" })
      )
    );
    return { tr, cells };
  }

  function updateLetterRow(row, x) {
    const c = row.cells;
    c.received.textContent = formatTime(x.receivedAt);
    c.topic.textContent = x.originalTopic;
    c.exception.textContent = x.exceptionFqcn || "(none)";
    c.message.textContent = truncate(x.exceptionMessage, 160);
    c.broadcast.textContent = x.broadcastId || "—";
    c.broadcast.title = x.userId ? "user " + x.userId : "";
    c.status.textContent = x.status;
    c.status.className = "badge status " + x.status;
  }

  function renderLetters(page) {
    const d = state.dlt;
    const tbody = $("dlt-list").tBodies[0];
    const seen = new Set();
    page.items.forEach((x, index) => {
      const key = String(x.id);
      let row = d.rows.get(key);
      if (!row) {
        row = newLetterRow(key);
        d.rows.set(key, row);
      }
      updateLetterRow(row, x);
      placeAt(tbody, row.tr, index);
      seen.add(key);
    });
    for (const [key, row] of d.rows) {
      if (!seen.has(key)) {
        row.tr.remove();
        d.rows.delete(key);
      }
    }
    show($("dlt-empty"), page.items.length === 0);
    show($("dlt-more"), page.nextCursor !== null && page.nextCursor !== undefined && d.limit < MAX_PAGE);
  }

  async function refreshDlt() {
    const d = state.dlt;
    const seq = ++d.seq;
    const filters = dltFilters();
    try {
      const [summary, page] = await Promise.all([
        api("GET", "/api/admin/dlt/summary" + query(filters)),
        api("GET", "/api/admin/dlt/messages" + query(Object.assign({ limit: d.limit }, filters))),
      ]);
      if (seq !== d.seq) return;
      renderSummary(summary);
      renderLetters(page);
      say($("dlt-error"), "");
    } catch (err) {
      if (seq === d.seq) fail($("dlt-error"), "Could not refresh the dead letters (retrying)", err);
    }
  }

  /** Show an action's outcome in #dlt-result: a line, and optionally a list of per-letter failures. */
  function dltResult(text, isError, failures) {
    const area = $("dlt-result");
    const children = [el("p", { className: isError ? "error" : "", text })];
    if (failures && failures.length) {
      const items = failures.map((f) => el("li", { text: "letter " + f.id + ": " + f.reason }));
      children.push(el("ul", { className: "error" }, ...items));
    }
    area.replaceChildren(...children);
    show(area, true);
  }

  function bulkText(action, r) {
    const parts = ["matched " + r.matched];
    if (action === "redrive") parts.push("redriven " + r.redriven, "already redriven " + r.alreadyRedriven);
    else parts.push("purged " + r.purged);
    parts.push("failed " + r.failed);
    return (action === "redrive" ? "Redrive all: " : "Purge all: ") + parts.join(", ");
  }

  async function bulkAction(action) {
    if (action === "purge" && !window.confirm("Purge every dead letter matching the filters? This cannot be undone.")) {
      return;
    }
    const button = $(action === "redrive" ? "dlt-redrive-all" : "dlt-purge-all");
    const url = action === "redrive" ? "/api/admin/dlt/redrive-all" : "/api/admin/dlt/purge-all";
    button.disabled = true;
    try {
      const result = await api(action === "redrive" ? "POST" : "DELETE", url + query(dltFilters()));
      dltResult(bulkText(action, result), result.failed > 0, result.failures);
    } catch (err) {
      const what = action === "redrive" ? "Redrive all" : "Purge all";
      if (!(err instanceof StaleAnswer)) dltResult(what + " failed: " + describe(err), true);
    } finally {
      button.disabled = false;
    }
    await refreshDlt();
    if (state.dlt.detailId === null) return;
    if (action === "purge") closeDetail();
    else openDetail(state.dlt.detailId);
  }

  async function redriveLetter(id, button) {
    button.disabled = true;
    try {
      const r = await api("POST", path("/api/admin/dlt/redrive", id));
      dltResult(r.alreadyRedriven ? "Letter " + r.id + " was already redriven" : "Letter " + r.id + " redriven", false);
    } catch (err) {
      if (!(err instanceof StaleAnswer)) dltResult("Could not redrive letter " + id + ": " + describe(err), true);
    } finally {
      button.disabled = false;
    }
    await refreshDlt();
    if (state.dlt.detailId === id) openDetail(id);
  }

  async function purgeLetter(id, button) {
    if (!window.confirm("Purge dead letter " + id + "? This cannot be undone.")) return;
    button.disabled = true;
    try {
      await api("DELETE", path("/api/admin/dlt/purge", id));
      dltResult("Letter " + id + " purged", false);
      if (state.dlt.detailId === id) closeDetail();
    } catch (err) {
      if (!(err instanceof StaleAnswer)) dltResult("Could not purge letter " + id + ": " + describe(err), true);
    } finally {
      button.disabled = false;
    }
    await refreshDlt();
  }

  function onLettersClick(event) {
    const button = event.target.closest("button");
    const tr = button && button.closest("tr[data-letter]");
    if (!tr) return;
    const id = tr.dataset.letter;
    if (button.classList.contains("dlt-detail")) openDetail(id);
    else if (button.classList.contains("dlt-redrive")) redriveLetter(id, button);
    else if (button.classList.contains("dlt-purge")) purgeLetter(id, button);
  }

  function showMoreLetters() {
    state.dlt.limit = Math.min(state.dlt.limit + PAGE_STEP, MAX_PAGE);
    refreshDlt();
  }

  // ------------------------------------------------------------------------------------------ letter detail
  /** Bytes as the API shows them ({text, base64, size}): the text when UTF-8, else the base64. */
  function bytesText(value) {
    if (!value) return "(none)";
    return value.text !== null && value.text !== undefined ? value.text : "base64: " + value.base64;
  }

  function position(topic, partition, offset) {
    return topic + " [partition " + (partition ?? "?") + ", offset " + (offset ?? "?") + "]";
  }

  function renderFacts(x) {
    const facts = [
      ["Status", x.status],
      ["Received", formatTime(x.receivedAt)],
      ["Dead-letter position", position(x.dltTopic, x.dltPartition, x.dltOffset)],
      ["Original position", position(x.originalTopic, x.originalPartition, x.originalOffset)],
      ["Original time", formatTime(x.originalTimestamp)],
      ["Exception", x.exceptionFqcn || "(none)"],
      ["Cause", x.exceptionCauseFqcn || "(none)"],
      ["Consumer group", x.consumerGroup || "(none)"],
      ["Broadcast", x.broadcastId || "(none)"],
      ["User", x.userId || "(none)"],
      ["Event type", x.eventType || "(none)"],
      ["Key", bytesText(x.key)],
    ];
    const rows = facts.map(([name, value]) => el("tr", {}, el("th", { text: name }), el("td", { text: value })));
    $("dlt-facts").replaceChildren(...rows);
  }

  function headerValue(h) {
    const shown = bytesText(h);
    return h.int !== undefined && h.int !== null ? h.int + " (" + shown + ")" : shown;
  }

  function auditItem(a) {
    const detail = a.detail && Object.keys(a.detail).length ? " " + JSON.stringify(a.detail) : "";
    return el("li", { text: formatTime(a.at) + " · " + a.actor + " · " + a.action + " → " + a.outcome + detail });
  }

  function renderDetail(x) {
    $("dlt-detail-id").textContent = String(x.id);
    renderFacts(x);
    $("dlt-exception-message").textContent = x.exceptionMessage || "(none)";
    const payload = x.payload;
    $("dlt-payload").textContent = payload ? bytesText(payload) : "(none: tombstone)";
    $("dlt-payload-note").textContent = payload
      ? "(" + payload.size + " bytes" + (payload.text === null ? ", not UTF-8: shown in base64" : "") + ")"
      : "";
    $("dlt-headers").tBodies[0].replaceChildren(
      ...(x.headers || []).map((h) => el("tr", {}, el("td", { text: h.key }), el("td", { text: headerValue(h) })))
    );
    $("dlt-stacktrace").textContent = x.stacktrace || "(none)";
    const audit = x.audit || [];
    $("dlt-audit").replaceChildren(
      ...(audit.length ? audit.map(auditItem) : [el("li", { className: "muted", text: "no actions yet" })])
    );
  }

  async function openDetail(id) {
    state.dlt.detailId = id;
    say($("dlt-detail-error"), "");
    show($("dlt-detail"), true);
    try {
      const letter = await api("GET", path("/api/admin/dlt/messages", id));
      if (state.dlt.detailId === id) renderDetail(letter);
    } catch (err) {
      if (state.dlt.detailId === id) fail($("dlt-detail-error"), "Could not load letter " + id, err);
    }
  }

  function closeDetail() {
    state.dlt.detailId = null;
    show($("dlt-detail"), false);
    for (const id of ["dlt-detail-id", "dlt-exception-message", "dlt-payload", "dlt-payload-note", "dlt-stacktrace"]) {
      $(id).textContent = "";
    }
    $("dlt-facts").replaceChildren();
    $("dlt-headers").tBodies[0].replaceChildren();
    $("dlt-audit").replaceChildren();
  }

  // ------------------------------------------------------------------------------------------ fault drill
  /** "broadcast <id>" or "next broadcast" */
  function drillScope(d) {
    return d.broadcastId ? "broadcast " + d.broadcastId : d.scope;
  }

  function drillItem(d) {
    const armed = "armed by " + d.armedBy + " at " + formatTime(d.armedAt);
    const text = "#" + d.id + " · " + drillScope(d) + " · " + armed + " · until " + formatTime(d.expiresAt);
    return el("li", { dataset: { drill: String(d.id) }, text });
  }

  /** One ``li`` per armed drill (only those: an empty list says so in #drill-none). */
  function renderDrills(armed) {
    $("drill-armed").replaceChildren(...armed.map(drillItem));
    show($("drill-none"), armed.length === 0);
  }

  function disableDrill() {
    state.drillEnabled = false;
    show($("drill"), false);
  }

  async function refreshDrills() {
    if (state.drillEnabled === false) return;
    try {
      const answer = await api("GET", DRILL_PATH);
      state.drillEnabled = true;
      show($("drill"), true);
      renderDrills(answer.armed || []);
    } catch (err) {
      if (err && err.status === 404) disableDrill();
      else fail($("drill-error"), "Could not list the armed drills (retrying)", err);
    }
  }

  async function armDrill(event) {
    event.preventDefault();
    say($("drill-error"), "");
    say($("drill-result"), "");
    const seconds = $("drill-seconds").value.trim();
    if (!/^\d+$/.test(seconds) || Number(seconds) < 1) {
      say($("drill-error"), "Expires in: a whole number of seconds, at least 1");
      return;
    }
    const body = { expiresInSeconds: Number(seconds) };
    const broadcastId = $("drill-broadcast").value.trim();
    if (broadcastId) body.broadcastId = broadcastId;
    const button = $("drill-arm");
    button.disabled = true;
    try {
      const drill = await api("POST", DRILL_PATH, body);
      const until = " until " + formatTime(drill.expiresAt);
      say($("drill-result"), "Armed drill #" + drill.id + " for the " + drillScope(drill) + until);
      await refreshDrills();
    } catch (err) {
      if (err && err.status === 404) disableDrill();
      else fail($("drill-error"), "Not armed", err);
    } finally {
      button.disabled = false;
    }
  }

  // ------------------------------------------------------------------------------------------ users
  function showUser(user, verb) {
    $("user-name").value = user.displayName || "";
    $("user-roles").value = (user.roles || []).join(", ");
    say($("user-result"), verb + " " + user.id + ": roles " + (user.roles.length ? user.roles.join(", ") : "(none)"));
  }

  async function userRequest(method, body, verb) {
    say($("user-error"), "");
    say($("user-result"), "");
    const id = $("user-id").value.trim();
    if (!id) {
      say($("user-error"), "Enter a user id");
      return;
    }
    try {
      showUser(await api(method, path("/api/admin/users", id), body), verb);
    } catch (err) {
      if (err && err.status === 404 && method === "GET") say($("user-result"), "No such user yet: saving creates it.");
      else fail($("user-error"), "", err);
    }
  }

  function loadUser() {
    $("user-name").value = ""; // never carry the previous user's fields over to this one
    $("user-roles").value = "";
    userRequest("GET", undefined, "Loaded");
  }

  function saveUser(event) {
    event.preventDefault();
    const body = { roles: splitList($("user-roles").value) };
    const name = $("user-name").value.trim();
    if (name) body.displayName = name;
    userRequest("PUT", body, "Saved");
  }

  // ------------------------------------------------------------------------------------------ wiring
  function wire() {
    $("dev-form").addEventListener("submit", devSignIn);
    $("token-form").addEventListener("submit", useToken);
    $("signout").addEventListener("click", signOut);
    $("create-form").addEventListener("submit", submitCreate);
    $("target-type").addEventListener("change", onTargetTypeChange);
    $("csv-file").addEventListener("change", onFileChange);
    $("status-filter").addEventListener("change", () => {
      state.broadcasts.limit = PAGE_STEP;
      refreshBroadcasts();
    });
    $("broadcasts").addEventListener("click", onBroadcastsClick);
    $("broadcasts-more").addEventListener("click", showMoreBroadcasts);
    $("deliveries-more").addEventListener("click", showMoreDeliveries);
    $("deliveries-close").addEventListener("click", closeDeliveries);
    $("dlt-refresh").addEventListener("click", refreshDlt);
    $("dlt-status").addEventListener("change", refreshDlt);
    for (const id of ["dlt-topic", "dlt-exception", "dlt-broadcast"]) {
      $(id).addEventListener("keydown", (event) => {
        if (event.key === "Enter") refreshDlt();
      });
    }
    $("dlt-redrive-all").addEventListener("click", () => bulkAction("redrive"));
    $("dlt-purge-all").addEventListener("click", () => bulkAction("purge"));
    $("dlt-list").addEventListener("click", onLettersClick);
    $("dlt-more").addEventListener("click", showMoreLetters);
    $("dlt-detail-close").addEventListener("click", closeDetail);
    $("drill-form").addEventListener("submit", armDrill);
    $("user-form").addEventListener("submit", saveUser);
    $("user-load").addEventListener("click", loadUser);
    $("user-id").addEventListener("keydown", (event) => {
      if (event.key === "Enter") {
        event.preventDefault(); // Enter in the id field loads; only the Save button replaces roles
        loadUser();
      }
    });
    window.addEventListener("storage", (event) => {
      if (event.key === TOKEN_KEY || event.key === null) applySession(); // signed in or out in another tab
    });
  }

  wire();
  onTargetTypeChange();
  onFileChange();
  applySession();
  loadDevStatus();
})();
