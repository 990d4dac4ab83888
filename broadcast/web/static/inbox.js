// The user inbox: one EventSource per tab (through BroadcastClient), messages rendered as text.
(function () {
  "use strict";

  const TOKEN_KEY = "broadcast.token";
  const USER_KEY = "broadcast.user";
  const $ = (id) => document.getElementById(id);
  const messages = new Map(); // broadcastId -> {message, element}
  let client = null;

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

  function signOut() {
    localStorage.removeItem(TOKEN_KEY);
    localStorage.removeItem(USER_KEY);
    if (client) client.close();
    client = null;
    clearMessages();
    showSignIn();
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
    const urgent = [...messages.values()].filter((m) => !m.message.read && m.message.priority === "URGENT");
    const banner = $("urgent");
    banner.classList.toggle("hidden", urgent.length === 0);
    banner.textContent = urgent.length ? "URGENT: " + urgent[urgent.length - 1].message.content : "";
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

  function show(message, fromInbox) {
    const known = messages.get(message.broadcastId);
    if (known) {
      if (message.read && !known.message.read) setRead(message.broadcastId);
      return;
    }
    const element = messageElement(message);
    messages.set(message.broadcastId, { message, element });
    const list = $("messages");
    // newest first: a live message goes on top; the inbox page is already newest first
    if (fromInbox) list.append(element);
    else list.prepend(element);
    render();
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
      $("notice").textContent = "Could not mark as read: " + err.message;
    }
  }

  async function loadInbox() {
    const items = [];
    let page = await client.inbox();
    items.push(...page.items);
    while (page.nextCursor && items.length < 2000) {
      page = await client.inbox(page.nextCursor);
      items.push(...page.items);
    }
    clearMessages();
    for (const message of items) show(message, true);
    client.remember(items.map((m) => m.broadcastId));
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
    $("signin").classList.add("hidden");
    $("app").classList.remove("hidden");
    $("signout").classList.remove("hidden");
    $("whoami").textContent = localStorage.getItem(USER_KEY) || "(token)";
    if (client) client.close();
    client = new BroadcastClient({ token: () => localStorage.getItem(TOKEN_KEY) });
    client.on("state", setState);
    client.on("message", (m) => show(m, false));
    client.on("read", (r) => r && setRead(r.broadcastId));
    client.on("removed", (r) => r && remove(r.broadcastId));
    client.on("resync", () => loadInbox().catch((err) => ($("notice").textContent = err.message)));
    client.on("limit", (l) => ($("notice").textContent = "Too many open tabs (limit " + (l && l.limit) + ")."));
    client.on("unauthorized", () => showSignIn("Your sign-in is no longer valid."));
    try {
      await loadInbox();
    } catch (err) {
      if (err.status === 401) {
        showSignIn("Your sign-in is no longer valid.");
        return;
      }
      $("notice").textContent = "Could not load the inbox: " + err.message;
    }
    client.connect();
  }

  document.addEventListener("DOMContentLoaded", () => {
    $("dev-signin").addEventListener("click", devSignIn);
    $("use-token").addEventListener("click", useToken);
    $("signout").addEventListener("click", signOut);
    window.addEventListener("storage", (event) => {
      if (event.key === TOKEN_KEY && event.newValue === null) signOut();
    });
    start();
  });
})();
