// The user inbox: one EventSource per tab (through BroadcastClient), messages rendered as text.
(function () {
  "use strict";

  const TOKEN_KEY = "broadcast.token";
  const USER_KEY = "broadcast.user";
  const $ = (id) => document.getElementById(id);
  const messages = new Map(); // broadcastId -> {message, element}
  let client = null;
  let starting = false;
  let loading = null; // while the inbox loads: stream events wait here, applied after the merge

  function text(tag, value, className) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    node.textContent = value == null ? "" : String(value);
    return node;
  }

  function signedIn() {
    return localStorage.getItem(TOKEN_KEY) !== null;
  }

  function showSignIn(error) {
    $("signin").classList.remove("hidden");
    $("app").classList.add("hidden");
    $("signout").classList.add("hidden");
    $("whoami").textContent = "";
    $("signin-error").textContent = error || "";
    fetch("/dev/status")
      .then((r) => r.json())
      .then((s) => $("dev-signin-box").classList.toggle("hidden", !s.devSignIn))
      .catch(() => undefined);
  }

  async function devSignIn() {
    if (starting) return;
    const roles = $("dev-roles").value.split(",").map((r) => r.trim()).filter(Boolean);
    try {
      const response = await fetch("/dev/token", {
        method: "POST",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ sub: $("dev-user").value.trim(), roles }),
      });
      const body = await response.json();
      if (!response.ok) throw new Error(body.detail || body.title);
      localStorage.setItem(TOKEN_KEY, body.token);
      localStorage.setItem(USER_KEY, body.sub);
      start();
    } catch (err) {
      $("signin-error").textContent = "Sign-in failed: " + err.message;
    }
  }

  function useToken() {
    const token = $("token").value.trim();
    if (!token) return;
    localStorage.setItem(TOKEN_KEY, token);
    localStorage.removeItem(USER_KEY);
    start();
  }

  function signOut(reason) {
    localStorage.removeItem(TOKEN_KEY);
    localStorage.removeItem(USER_KEY);
    if (client) client.close();
    client = null;
    clearMessages();
    $("token").value = "";
    showSignIn(typeof reason === "string" ? reason : "");
  }

  function clearMessages() {
    messages.clear();
    $("messages").replaceChildren();
    render();
  }

  function render() {
    const unread = [...messages.values()].filter((m) => !m.message.read).length;
    $("unread-count").textContent = String(unread);
    $("empty").classList.toggle("hidden", messages.size > 0);
    const urgent = [...messages.values()]
      .map((m) => m.message)
      .filter((m) => !m.read && m.priority === "URGENT")
      .sort((a, b) => (a.createdAt < b.createdAt ? 1 : -1)); // the newest first
    const banner = $("urgent");
    banner.classList.toggle("hidden", urgent.length === 0);
    banner.textContent = urgent.length ? "URGENT: " + urgent[0].content : "";
  }

  function messageElement(message) {
    const item = document.createElement("li");
    item.className = "message " + message.priority + (message.read ? "" : " unread");
    item.dataset.id = message.broadcastId;
    const meta = document.createElement("div");
    meta.className = "meta";
    meta.append(text("span", message.priority, "badge " + message.priority + " priority"));
    if (message.category) meta.append(text("span", message.category, "badge category"));
    meta.append(text("span", "from " + message.senderId, "sender"));
    meta.append(text("time", new Date(message.createdAt).toLocaleString(), "created"));
    const read = text("button", "Mark read", "secondary mark-read");
    read.type = "button";
    read.classList.toggle("hidden", Boolean(message.read));
    read.addEventListener("click", () => markRead(message.broadcastId));
    meta.append(read);
    item.append(meta, text("div", message.content, "content"));
    return item;
  }

  function show(message) {
    const known = messages.get(message.broadcastId);
    if (known) {
      if (message.read && !known.message.read) setRead(message.broadcastId);
      return;
    }
    const element = messageElement(message);
    messages.set(message.broadcastId, { message, element });
    // newest first, by creation time (live messages and inbox pages may arrive in any order)
    const later = [...$("messages").children].find((li) => {
      const other = messages.get(li.dataset.id);
      return other && other.message.createdAt < message.createdAt;
    });
    $("messages").insertBefore(element, later || null);
    render();
  }

  function whenLoaded(apply) {
    return (value) => (loading ? loading.push(() => apply(value)) : apply(value));
  }

  function setRead(broadcastId) {
    const known = messages.get(broadcastId);
    if (!known) return;
    known.message.read = true;
    known.element.classList.remove("unread");
    known.element.querySelector(".mark-read").classList.add("hidden");
    render();
  }

  function remove(broadcastId) {
    const known = messages.get(broadcastId);
    if (!known) return;
    known.element.remove();
    messages.delete(broadcastId);
    render();
  }

  async function markRead(broadcastId) {
    setRead(broadcastId);
    try {
      await client.markRead([broadcastId]);
    } catch (err) {
      const known = messages.get(broadcastId);
      if (known) {
        known.message.read = false;
        known.element.classList.add("unread");
        known.element.querySelector(".mark-read").classList.remove("hidden");
        render();
      }
      $("notice").textContent = "Could not mark as read: " + err.message;
    }
  }

  // The inbox is (re)loaded after every CONNECTED and on RESYNC, and merged into the page: messages that
  // arrived live meanwhile stay; messages the page showed before the load and the inbox no longer has
  // (cancelled or expired while the stream was away) go; read flags follow the inbox. Stream events that
  // arrive during the load are applied after the merge, so an older snapshot never undoes them.
  async function loadInbox() {
    if (loading) return;
    loading = [];
    const before = new Set(messages.keys());
    try {
      const items = [];
      let page = await client.inbox();
      items.push(...page.items);
      while (page.nextCursor && items.length < 2000) {
        page = await client.inbox(page.nextCursor);
        items.push(...page.items);
      }
      const listed = new Set(items.map((m) => m.broadcastId));
      if (!page.nextCursor) for (const id of before) if (!listed.has(id)) remove(id);
      for (const message of items) {
        show(message);
        if (message.read) setRead(message.broadcastId);
      }
      client.remember(listed);
    } finally {
      const queued = loading;
      loading = null;
      for (const apply of queued) apply();
    }
  }

  function setState(state) {
    const badge = $("connection");
    badge.textContent = state;
    badge.className = "badge " + state;
  }

  async function start() {
    if (!signedIn()) {
      showSignIn();
      return;
    }
    if (starting) return;
    starting = true;
    try {
      await restart();
    } finally {
      starting = false;
    }
  }

  async function restart() {
    $("signin").classList.add("hidden");
    $("app").classList.remove("hidden");
    $("signout").classList.remove("hidden");
    $("whoami").textContent = localStorage.getItem(USER_KEY) || "(token)";
    if (client) client.close();
    clearMessages();
    const token = localStorage.getItem(TOKEN_KEY);
    client = new BroadcastClient({ token: () => token }); // this page's identity, until it restarts
    const reload = () =>
      loadInbox().catch((err) => {
        if (err.status === 401) signOut("Your sign-in is no longer valid.");
        else $("notice").textContent = "Could not load the inbox: " + err.message;
      });
    client.on("state", setState);
    client.on("connected", () => {
      $("notice").textContent = "";
      reload();
    });
    client.on("message", whenLoaded((m) => show(m)));
    client.on("read", whenLoaded((r) => setRead(r.broadcastId)));
    client.on("removed", whenLoaded((r) => remove(r.broadcastId)));
    client.on("resync", reload);
    client.on("limit", (l) => ($("notice").textContent = "Too many open tabs (limit " + l.limit + ")."));
    client.on("unauthorized", () => signOut("Your sign-in is no longer valid."));
    client.connect();
  }

  document.addEventListener("DOMContentLoaded", () => {
    $("dev-signin").addEventListener("click", devSignIn);
    $("use-token").addEventListener("click", useToken);
    $("signout").addEventListener("click", signOut);
    // another tab of this browser signed out or in as someone else: follow it (never act as one user
    // while showing another)
    window.addEventListener("storage", (event) => {
      if (event.key !== TOKEN_KEY) return;
      if (event.newValue === null) signOut();
      else start();
    });
    start();
  });
})();
