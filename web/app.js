// The Hubbub chat page: rooms, DMs, presence, typing, scrollback, unread counts and a
// visible connection status, on top of the SDK in /hubbub.js. Every piece of user text
// is put on the page with textContent, never as HTML.
//
// Chat state (protocol 1.1): rooms joined here are the user's rooms on every device
// (`persist`), rejoined at login; badges are the server's unread counts, cleared on
// every tab and device when read; one's own messages can be edited (Up arrow edits
// the last one) and deleted (after a confirmation); anyone can react; a DM shows
// "Seen" under the last message the other person has read.
import { Hubbub, applyEntry, channelKey } from "/hubbub.js";

/** The reactions offered on every message. */
const EMOJI = ["👍", "❤️", "😂", "🎉", "😮"];

const $ = (id) => document.getElementById(id);
const el = (tag, cls, text) => {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text;
  return e;
};

/** Conversations: "r:<room>" or "d:<user>". */
const convs = new Map(); // key -> { kind, id, messages: Map(seq -> msg), pending: Map(client_id -> {...}), unread, members: Map, oldest, complete }
let current = null; // key
let hub = null;
let me = null;
let statusTimer = null;
const typingTimers = new Map(); // user -> { name, timer }
let lastTypingSent = 0;

const ERROR_TEXT = {
  rate_limited: "You're sending too fast — wait a moment.",
  too_large: "That's too long.",
  forbidden: "You're not allowed to do that.",
  not_joined: "Join the room first.",
  bad_request: "The server didn't accept that.",
  unavailable: "The server is busy — try again shortly.",
  unauthorized: "Not authorized.",
  not_found: "That message is gone.",
  timeout: "No answer from the server.",
  closed: "Not connected.",
};
const explain = (e) => {
  const base = ERROR_TEXT[e.code] || "Something went wrong.";
  return e.message && e.message !== e.code ? `${base} (${e.message})` : base;
};

function conv(key) {
  if (!convs.has(key)) {
    const [kind, ...rest] = key.split(":");
    convs.set(key, {
      kind: kind === "r" ? "room" : "dm",
      id: rest.join(":"),
      messages: new Map(),
      pending: new Map(),
      unread: 0,
      members: new Map(),
      // Users in the room on every node; in a large room only a page of them is in
      // `members` (more come with "Show more", via presence pages).
      memberCount: 0,
      oldest: null,
      complete: false,
    });
  }
  return convs.get(key);
}
const keyOf = (m) => (m.room !== undefined ? `r:${m.room}` : `d:${m.dm}`);

// ---------- login ----------

$("login-name").value = localStorage.getItem("hubbub.name") || "";
$("login-form").addEventListener("submit", (ev) => {
  ev.preventDefault();
  const name = $("login-name").value.trim();
  const token = $("login-token").value.trim();
  if (!token && !/^[A-Za-z0-9_.-]{1,32}$/.test(name)) {
    $("login-error").textContent = "Names are 1-32 letters, digits, _ - or . (no spaces).";
    return;
  }
  $("login-error").textContent = "";
  if (!token) localStorage.setItem("hubbub.name", name);
  start(token ? { token } : { name });
});

// ---------- live tokens ----------

// Logged in with a token, the page asks for a new one when the server says it is
// expiring (the SDK then refreshes the live connection with it), and again if it
// did expire (the SDK reconnects with the new one).
let tokenWaiter = null;
function askForToken() {
  if (!tokenWaiter) {
    let resolve;
    const promise = new Promise((r) => (resolve = r));
    tokenWaiter = { promise, resolve };
  }
  $("token-form").hidden = false;
  $("token-new").focus();
  return tokenWaiter.promise;
}

$("token-form").addEventListener("submit", (ev) => {
  ev.preventDefault();
  const token = $("token-new").value.trim();
  if (!token) return;
  $("token-error").textContent = "";
  if (tokenWaiter) {
    const w = tokenWaiter;
    tokenWaiter = null;
    w.resolve(token);
  } else {
    // A retry after a refused refresh.
    hub.refresh(token).catch((e) => ($("token-error").textContent = explain(e)));
  }
});

function tokenAccepted() {
  $("token-form").hidden = true;
  $("token-new").value = "";
  $("token-error").textContent = "";
}

function start(identity) {
  const proto = location.protocol === "https:" ? "wss" : "ws";
  const getToken = identity.token ? askForToken : undefined;
  hub = new Hubbub({ url: `${proto}://${location.host}/ws`, ...identity, getToken });
  hub.on("refreshed", tokenAccepted);
  hub.on("error", (e) => {
    if (e.command?.type === "refresh") {
      $("token-form").hidden = false;
      $("token-error").textContent = explain(e);
    }
  });
  hub.on("state", showState);
  hub.on("message", onMessage);
  for (const t of ["edit", "delete", "react"]) hub.on(t, onEntry);
  hub.on("unread", onUnread);
  hub.on("member", onMember);
  hub.on("members", onMembers);
  hub.on("typing", onTyping);
  hub.on("closing", (c) => setStatus("closing", `Server: ${c.reason || "closing"}`));
  hub.on("welcome", (w) => {
    if (identity.token && !$("token-form").hidden && !tokenWaiter) tokenAccepted();
    me = w.user;
    $("me").textContent = w.name === w.user ? w.user : `${w.name} (${w.user})`;
  });
  $("login-submit").disabled = true;
  hub
    .connect()
    .then(() => {
      $("login").hidden = true;
      $("app").hidden = false;
      $("join-room").focus();
      // The user's rooms (from any device) and this browser's, then the DMs.
      const last = localStorage.getItem("hubbub.rooms");
      const rooms = new Set([...hub.myRooms(), ...(last ? JSON.parse(last) : [])]);
      for (const room of rooms) joinRoom(room, false);
      for (const u of hub.unreadState()) {
        if (u.dm !== undefined) {
          const c = conv(u.key);
          c.unread = u.unread;
          c.peerRead = u.peer_read || 0;
        }
      }
      renderLists();
    })
    .catch((e) => {
      $("login-submit").disabled = false;
      $("login-error").textContent = explain(e);
    });
}

// ---------- connection status ----------

function setStatus(state, text) {
  const s = $("status");
  s.dataset.state = state;
  s.textContent = text;
}

function showState(s) {
  if (statusTimer) clearInterval(statusTimer);
  statusTimer = null;
  if (s.state === "open") setStatus("open", "Connected");
  else if (s.state === "connecting") setStatus("connecting", "Connecting…");
  else if (s.state === "reconnecting") {
    const until = Date.now() + s.delay;
    const tick = () => {
      const left = Math.max(0, Math.ceil((until - Date.now()) / 1000));
      setStatus("reconnecting", left > 0 ? `Reconnecting in ${left} s…` : "Reconnecting…");
    };
    tick();
    statusTimer = setInterval(tick, 250);
  } else if (s.state === "closed") {
    // The server's close reason says why when it is more than the generic word
    // (a ban says "banned").
    const why = s.reason && s.reason !== "unauthorized" ? s.reason : "token expired or invalid";
    setStatus("closed", s.code === 4001 ? `Signed out: ${why}` : "Disconnected");
  }
}

// ---------- rooms and DMs ----------

function saveRooms() {
  localStorage.setItem("hubbub.rooms", JSON.stringify(hub.rooms()));
}

$("join-form").addEventListener("submit", (ev) => {
  ev.preventDefault();
  const room = $("join-room").value.trim();
  if (!room) return;
  if (!/^[A-Za-z0-9_.:\-]{1,64}$/.test(room)) {
    $("join-error").textContent = "Room names are 1-64 letters, digits, _ - . or : (no spaces).";
    return;
  }
  joinRoom(room, true);
});

function joinRoom(room, open) {
  $("join-error").textContent = "";
  const c = conv(`r:${room}`);
  hub
    .join(room, { history: 50, persist: true })
    .then((j) => {
      c.members = new Map(j.members.map((m) => [m.user, m.name]));
      c.memberCount = j.member_count ?? j.members.length;
      if (c.oldest === null && j.messages.length) c.oldest = j.messages[0].seq;
      if (j.messages.length === 0 || j.messages[0].seq === 1) c.complete = true;
      $("join-room").value = "";
      saveRooms();
      renderLists();
      if (open || current === null) {
        openConv(`r:${room}`);
        if (open) $("composer-text").focus();
      } else if (current === `r:${room}`) renderMembers();
    })
    .catch((e) => {
      $("join-error").textContent = `${room}: ${explain(e)}`;
    });
}

$("leave").addEventListener("click", () => {
  if (!current || conv(current).kind !== "room") return;
  const key = current;
  const room = conv(key).id;
  hub
    .leave(room, { persist: true })
    .then(() => {
      convs.delete(key);
      saveRooms();
      current = null;
      const next = [...convs.keys()][0];
      if (next) openConv(next);
      else renderEmpty();
      renderLists();
    })
    .catch((e) => ($("composer-error").textContent = explain(e)));
});

function openDm(user) {
  const key = `d:${user}`;
  const c = conv(key);
  renderLists();
  openConv(key);
  if (!c.loaded) {
    c.loaded = true;
    hub
      .history({ dm: user, limit: 50, current: true })
      .then((h) => {
        for (const m of h.messages) c.messages.set(m.seq, m);
        if (h.messages.length) c.oldest = h.messages[0].seq;
        if (h.messages.length < 50) c.complete = true;
        if (current === key) renderMessages(true);
      })
      .catch((e) => ($("composer-error").textContent = explain(e)));
  }
}

function openConv(key) {
  current = key;
  const c = conv(key);
  markRead(key);
  $("chat-title").textContent = c.kind === "room" ? `# ${c.id}` : `@ ${c.id}`;
  $("leave").hidden = c.kind !== "room";
  $("composer-text").disabled = false;
  $("composer-send").disabled = false;
  $("composer-text").placeholder = c.kind === "room" ? `Message #${c.id}` : `Message @${c.id}`;
  $("composer-error").textContent = "";
  for (const user of [...typingTimers.keys()]) clearTyping(user);
  document.body.classList.remove("show-sidebar", "show-members");
  $("menu-toggle").setAttribute("aria-expanded", "false");
  renderLists();
  renderMessages(true);
  renderMembers();
  if (c.membersStale) loadMembers(true);
}

function renderEmpty() {
  $("chat-title").textContent = "No room yet";
  $("message-list").replaceChildren();
  $("empty").hidden = false;
  $("leave").hidden = true;
  $("composer-text").disabled = true;
  $("composer-send").disabled = true;
  $("member-list").replaceChildren();
}

function renderLists() {
  const rooms = $("room-list");
  const dms = $("dm-list");
  rooms.replaceChildren();
  dms.replaceChildren();
  for (const [key, c] of convs) {
    const li = el("li");
    const b = el("button", "conv" + (key === current ? " active" : ""));
    b.type = "button";
    b.dataset.key = key;
    b.append(el("span", "conv-name", c.kind === "room" ? `# ${c.id}` : `@ ${c.id}`));
    if (c.unread > 0) {
      const badge = el("span", "badge", String(c.unread));
      badge.setAttribute("aria-label", `${c.unread} unread`);
      b.append(badge);
    }
    if (key === current) b.setAttribute("aria-current", "true");
    b.addEventListener("click", () => (c.kind === "room" ? openConv(key) : openDm(c.id)));
    li.append(b);
    (c.kind === "room" ? rooms : dms).append(li);
  }
  $("dm-empty").hidden = dms.children.length > 0;
}

function renderMembers() {
  const list = $("member-list");
  list.replaceChildren();
  if (!current) return;
  const c = conv(current);
  const members = c.kind === "room" ? [...c.members] : [[me, me], [c.id, c.id]];
  members.sort((a, b) => (a[0] < b[0] ? -1 : a[0] > b[0] ? 1 : 0)); // the server's order
  const count = c.kind === "room" ? Math.max(c.memberCount, c.members.size) : 2;
  $("member-count").textContent = `(${count})`;
  $("members-more").hidden = !(c.kind === "room" && c.members.size < count);
  for (const [user, name] of members) {
    const li = el("li", "member");
    li.append(el("span", "dot"), el("span", "member-name", name === user ? user : `${name} (${user})`));
    if (user === me) li.append(el("span", "muted small", " you"));
    else if (c.kind === "room") {
      const dm = el("button", "link-button small", "Message");
      dm.type = "button";
      dm.setAttribute("aria-label", `Message ${user}`);
      dm.addEventListener("click", () => openDm(user));
      li.append(dm);
    }
    list.append(li);
  }
}

// ---------- messages ----------

function timeOf(ts) {
  const d = new Date(ts);
  return d.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
}

function messageNode(m, state, seen) {
  const mine = m.from === me || state === "pending" || state === "failed";
  const li = el("li", "msg" + (mine ? " mine" : "") + (state ? ` ${state}` : "") + (m.deleted ? " deleted" : ""));
  if (m.seq !== undefined) li.dataset.seq = String(m.seq);
  if (m.client_id) li.dataset.clientId = m.client_id;
  const head = el("div", "msg-head");
  head.append(el("span", "msg-from", mine ? "You" : m.name || m.from));
  head.append(el("time", "msg-time", state === "pending" ? "sending…" : m.ts ? timeOf(m.ts) : ""));
  if (m.edited_ts && !m.deleted) head.append(el("span", "msg-edited muted", "(edited)"));
  li.append(head);
  if (m.deleted) {
    li.append(el("div", "msg-text msg-deleted muted", "This message was deleted."));
    return li;
  }
  if (editing && editing.seq === m.seq && editing.key === current) li.append(editBox(m));
  else li.append(el("div", "msg-text", m.text));
  if (state === "failed") li.append(el("div", "msg-error error", m.error));
  if (m.seq !== undefined && !state) {
    li.append(reactionsRow(m));
    li.append(actions(m, mine));
  }
  if (seen) li.append(el("div", "msg-seen muted small", "Seen"));
  return li;
}

/** The message's reactions: one toggle button per emoji with its count. */
function reactionsRow(m) {
  const row = el("div", "reactions");
  for (const [emoji, users] of Object.entries(m.reactions || {})) {
    const mineToo = users.includes(me);
    const b = el("button", "reaction" + (mineToo ? " on" : ""), `${emoji} ${users.length}`);
    b.type = "button";
    b.title = users.join(", ");
    b.setAttribute("aria-pressed", String(mineToo));
    b.setAttribute("aria-label", `${emoji} ${users.length}: ${users.join(", ")}`);
    b.addEventListener("click", () => react(m, emoji, !mineToo));
    row.append(b);
  }
  return row;
}

/** React, and for one's own messages edit and delete. */
function actions(m, mine) {
  const bar = el("div", "msg-actions");
  const pick = el("details", "react-pick");
  const summary = el("summary", "link-button small", "React");
  summary.setAttribute("aria-label", `React to message ${m.seq}`);
  pick.append(summary);
  for (const emoji of EMOJI) {
    const b = el("button", "link-button", emoji);
    b.type = "button";
    b.setAttribute("aria-label", `React ${emoji}`);
    b.addEventListener("click", () => {
      pick.open = false;
      react(m, emoji, !(m.reactions?.[emoji] || []).includes(me));
    });
    pick.append(b);
  }
  bar.append(pick);
  if (mine) {
    const edit = el("button", "link-button small msg-edit", "Edit");
    edit.type = "button";
    edit.addEventListener("click", () => startEdit(m));
    const del = el("button", "link-button small danger msg-delete", "Delete");
    del.type = "button";
    del.addEventListener("click", () => deleteMessage(m));
    bar.append(edit, del);
  }
  return bar;
}

function whereOf(key) {
  const c = conv(key);
  return c.kind === "room" ? { room: c.id } : { dm: c.id };
}

function react(m, emoji, on) {
  hub.react(whereOf(current), m.seq, emoji, on).catch((e) => ($("composer-error").textContent = explain(e)));
}

// ---------- editing and deleting one's own messages ----------

let editing = null; // { key, seq }

function startEdit(m) {
  editing = { key: current, seq: m.seq };
  renderMessages(false);
  const box = document.querySelector(".edit-box textarea");
  if (box) {
    box.focus();
    box.setSelectionRange(box.value.length, box.value.length);
  }
}

function editBox(m) {
  const form = el("form", "edit-box");
  const label = el("label", "visually-hidden", "Edit message");
  const area = el("textarea");
  area.id = "edit-text";
  label.htmlFor = "edit-text";
  area.value = m.text || "";
  area.rows = 2;
  const save = el("button", "primary small", "Save");
  save.type = "submit";
  const cancel = el("button", "link-button small", "Cancel");
  cancel.type = "button";
  const done = () => {
    editing = null;
    renderMessages(false);
    $("composer-text").focus();
  };
  cancel.addEventListener("click", done);
  area.addEventListener("keydown", (ev) => {
    if (ev.key === "Escape") done();
    else if (ev.key === "Enter" && !ev.shiftKey) {
      ev.preventDefault();
      form.requestSubmit();
    }
  });
  form.addEventListener("submit", (ev) => {
    ev.preventDefault();
    const text = area.value;
    if (!text.trim() || text === m.text) return done();
    const key = editing.key;
    hub
      .edit(whereOf(key), m.seq, text)
      .then(done)
      .catch((e) => ($("composer-error").textContent = explain(e)));
  });
  form.append(label, area, save, cancel);
  return form;
}

function deleteMessage(m) {
  if (!confirm("Delete this message for everyone?")) return;
  hub.deleteMessage(whereOf(current), m.seq).catch((e) => ($("composer-error").textContent = explain(e)));
}

/** Up arrow in an empty composer edits one's last message. */
function editLast() {
  if (!current) return false;
  const c = conv(current);
  const mine = [...c.messages.values()].filter((m) => m.from === me && !m.deleted).sort((a, b) => b.seq - a.seq);
  if (!mine.length) return false;
  startEdit(mine[0]);
  return true;
}

function renderMessages(toBottom) {
  const list = $("message-list");
  const box = $("messages");
  list.replaceChildren();
  if (!current) return;
  const c = conv(current);
  const sorted = [...c.messages.values()].sort((a, b) => a.seq - b.seq);
  // In a DM, "Seen" under the last of one's messages the other person has read.
  const seenSeq =
    c.kind === "dm" && c.peerRead
      ? Math.max(0, ...sorted.filter((m) => m.from === me && m.seq <= c.peerRead).map((m) => m.seq))
      : 0;
  for (const m of sorted) list.append(messageNode(m, undefined, m.seq === seenSeq));
  for (const p of c.pending.values()) list.append(messageNode(p, p.state));
  $("empty").hidden = sorted.length + c.pending.size > 0;
  $("empty").textContent = "No messages yet. Say hello!";
  $("load-older").hidden = c.complete || sorted.length === 0;
  if (toBottom) box.scrollTop = box.scrollHeight;
}

function nearBottom() {
  const box = $("messages");
  return box.scrollHeight - box.scrollTop - box.clientHeight < 80;
}

function onMessage(m) {
  const key = keyOf(m);
  const c = conv(key);
  c.messages.set(m.seq, m);
  if (c.oldest === null || m.seq < c.oldest) c.oldest = m.seq;
  if (m.client_id && c.pending.has(m.client_id)) c.pending.delete(m.client_id);
  if (key === current) {
    const stick = nearBottom() || m.from === me;
    renderMessages(stick);
    if (m.from !== undefined) clearTyping(m.from);
    if (m.from !== me) markRead(key);
  } else {
    renderLists();
  }
}

/** An edit, delete or reaction: applied to the message this page shows. */
function onEntry(e) {
  const key = channelKey(e);
  const c = conv(key);
  const shown = c.messages.get(e.target);
  if (shown && shown !== e.message) applyEntry(shown, e);
  if (editing && e.type === "delete" && editing.seq === e.target) editing = null;
  if (key === current) renderMessages(nearBottom());
}

/** The server's unread count (and a DM peer's read receipt) for a conversation. */
function onUnread(u) {
  const c = conv(u.key);
  c.unread = u.key === current && document.visibilityState === "visible" ? 0 : u.unread;
  if (u.peer_read !== undefined && u.peer_read !== c.peerRead) {
    c.peerRead = u.peer_read;
    if (u.key === current) renderMessages(nearBottom());
  }
  renderLists();
}

/** Tell the server (and so every tab and device) that `key` is read up to its
 *  latest message, at most a few times a second. */
const readTimers = new Map();
function markRead(key) {
  const c = conv(key);
  c.unread = 0;
  if (readTimers.has(key)) return;
  readTimers.set(
    key,
    setTimeout(() => {
      readTimers.delete(key);
      const newest = Math.max(0, ...[...c.messages.keys()]);
      hub.markRead(whereOf(key), newest || undefined).catch(() => {});
    }, 150),
  );
}
document.addEventListener("visibilitychange", () => {
  if (document.visibilityState === "visible" && current) markRead(current);
});

async function loadOlder() {
  if (!current) return;
  const key = current;
  const c = conv(key);
  if (c.complete || c.loadingOlder || c.oldest === null) return;
  c.loadingOlder = true;
  const box = $("messages");
  const fromBottom = box.scrollHeight - box.scrollTop;
  try {
    const q = c.kind === "room" ? { room: c.id } : { dm: c.id };
    const h = await hub.history({ ...q, before: c.oldest, limit: 50, current: true });
    for (const m of h.messages) c.messages.set(m.seq, m);
    if (h.messages.length) c.oldest = h.messages[0].seq;
    // Fewer than asked for is the start, unless the reply was cut by bytes (`more`).
    if ((h.messages.length < 50 && !h.more) || c.oldest === 1) c.complete = true;
    if (current === key) {
      renderMessages(false);
      box.scrollTop = box.scrollHeight - fromBottom; // keep the reader's place
    }
  } catch (e) {
    $("composer-error").textContent = explain(e);
  } finally {
    c.loadingOlder = false;
  }
}
$("messages").addEventListener("scroll", () => {
  if ($("messages").scrollTop < 40) loadOlder();
});
$("load-older").addEventListener("click", loadOlder);

function newClientId() {
  return crypto.randomUUID ? crypto.randomUUID() : `${Date.now()}-${Math.random().toString(36).slice(2)}`;
}

$("composer").addEventListener("submit", (ev) => {
  ev.preventDefault();
  sendCurrent();
});
$("composer-text").addEventListener("keydown", (ev) => {
  if (ev.key === "Enter" && !ev.shiftKey) {
    ev.preventDefault();
    sendCurrent();
  } else if (ev.key === "ArrowUp" && ev.target.value === "" && editLast()) {
    ev.preventDefault();
  }
});
$("composer-text").addEventListener("input", () => {
  const c = current && conv(current);
  if (!c || c.kind !== "room") return;
  const now = Date.now();
  if (now - lastTypingSent > 2000) {
    lastTypingSent = now;
    hub.typing(c.id);
  }
});

function sendCurrent() {
  if (!current) return;
  const input = $("composer-text");
  const text = input.value;
  if (!text.trim()) return;
  const key = current;
  const c = conv(key);
  const clientId = newClientId();
  const pending = { text, from: me, client_id: clientId, state: "pending" };
  c.pending.set(clientId, pending);
  input.value = "";
  $("composer-error").textContent = "";
  renderMessages(true);
  const p = c.kind === "room" ? hub.send(c.id, text, { clientId }) : hub.direct(c.id, text, { clientId });
  p.then((ack) => {
    // The message event normally arrives too; if it has not yet, keep the bubble
    // until it does (it carries the same client_id).
    pending.seq = ack.seq;
  }).catch((e) => {
    pending.state = "failed";
    pending.error = explain(e);
    if (current === key) {
      renderMessages(false);
      $("composer-error").textContent = explain(e);
    }
  });
}

// ---------- presence and typing ----------

function onMember(ev) {
  const c = conv(`r:${ev.room}`);
  if (ev.event === "join") {
    if (!c.members.has(ev.user)) c.memberCount += 1;
    c.members.set(ev.user, ev.name);
  } else {
    if (c.members.delete(ev.user)) c.memberCount = Math.max(0, c.memberCount - 1);
  }
  if (current === `r:${ev.room}`) renderMembers();
}

// A large room sends counts instead of who joined or left: the count is exact, the
// list is a page that "Show more" extends (and that reloads when the panel opens).
function onMembers(ev) {
  const c = conv(`r:${ev.room}`);
  c.memberCount = ev.count;
  c.membersStale = true;
  if (current !== `r:${ev.room}`) return;
  renderMembers();
  // A list that fits one page is reloaded at once (one request a second at most,
  // as the counts arrive); a longer one when it is next opened or extended, so a
  // room of thousands does not have every client asking every second.
  if (ev.count <= 100) loadMembers(true);
}

async function loadMembers(reset) {
  if (!current) return;
  const c = conv(current);
  if (c.kind !== "room") return;
  const room = c.id;
  const known = [...c.members.keys()].sort();
  const after = reset ? undefined : known[known.length - 1];
  try {
    const page = await hub.presence(room, { after, limit: 100 });
    if (reset) c.members = new Map();
    for (const m of page.members) c.members.set(m.user, m.name);
    c.memberCount = page.member_count;
    if (reset) c.membersStale = false;
    if (current === `r:${room}`) renderMembers();
  } catch (e) {
    $("composer-error").textContent = explain(e);
  }
}

$("members-more").addEventListener("click", () => loadMembers(false));

function renderTyping() {
  const names = [...typingTimers.values()].map((t) => t.name);
  $("typing").textContent =
    names.length === 0 ? "" : names.length === 1 ? `${names[0]} is typing…` : `${names.join(", ")} are typing…`;
}

function clearTyping(user) {
  const t = typingTimers.get(user);
  if (t) {
    clearTimeout(t.timer);
    typingTimers.delete(user);
    renderTyping();
  }
}

function onTyping(ev) {
  if (current !== `r:${ev.room}`) return;
  clearTyping(ev.user);
  const timer = setTimeout(() => {
    typingTimers.delete(ev.user);
    renderTyping();
  }, 4000);
  typingTimers.set(ev.user, { name: ev.name, timer });
  renderTyping();
}

// ---------- narrow screens ----------

$("menu-toggle").addEventListener("click", () => {
  const open = document.body.classList.toggle("show-sidebar");
  $("menu-toggle").setAttribute("aria-expanded", String(open));
});

$("members-toggle").addEventListener("click", () => {
  const open = document.body.classList.toggle("show-members");
  $("members-toggle").setAttribute("aria-expanded", String(open));
  if (open && current && conv(current).membersStale) loadMembers(true);
});
