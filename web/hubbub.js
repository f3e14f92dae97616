// hubbub.js — the JavaScript SDK for the Hubbub wire protocol (docs/PROTOCOL.md).
//
// An ES module with no dependencies, served by the Hubbub binary at /hubbub.js:
//
//   import { Hubbub } from "/hubbub.js";
//   const hub = new Hubbub({ url: "ws://localhost:8080/ws", name: "alice" });
//   hub.on("message", (m) => console.log(m.from, m.text));
//   hub.on("state", (s) => console.log(s.state, s.delay));
//   await hub.connect();
//   await hub.join("lobby");
//   await hub.send("lobby", "hello!");
//
// What it guarantees:
// - Every command returns a promise resolved by the reply with the same `id`, or
//   rejected with a HubbubError (the server's `error`, or a timeout).
// - After an unexpected close it reconnects with exponential backoff (1 s doubling to
//   30 s, with jitter; reset once a connection has stayed up for 10 s), says `hello`
//   again and rejoins every room with `since` = the last `seq` it delivered, then
//   catches up direct messages from `history`.
// - Each message is delivered exactly once and in `seq` order per room / DM peer
//   (dedupe by `seq`), whether it came live, in `joined` or from `history`.
// - `send`/`direct` always carry a `client_id`. Made while disconnected, they are
//   queued and sent after reconnecting; in flight when the connection dropped, they
//   are sent again with the same `client_id`; answered `unavailable` (the server
//   cannot store or publish right now), they are resent with the same `client_id`
//   after 0.25, 0.5, 1, 2, 4, 4 s before the promise is rejected. Either way the
//   server stores them once.
// - After close 4001 (unauthorized / token expired) it does not reconnect, unless
//   it was given `getToken` and the token expired: then it asks for a new token
//   and reconnects with it. With `getToken` it also answers the server's
//   `token_expiring` with a `refresh` (a new token on the live connection: rooms
//   and presence stay), so a connection whose app keeps tokens fresh is never
//   closed for expiry.
// - When a draining server's `closing` suggests `reconnect_ms`, the next reconnect
//   waits that long instead of the backoff step (the server spreads it with jitter).
// - Chat state (protocol 1.1): edits, deletes and reactions are entries of a room's
//   (or DM's) seq stream, delivered in order with its messages. The SDK keeps the
//   last messages of each channel (MESSAGES_KEPT) and applies each entry to the
//   message it targets (applyEntry), then emits `edit`, `delete` or `react` with the
//   entry and the updated message. It keeps the user's rooms, DMs and unread counts
//   from `welcome`, counts new messages from others, and follows `read` events from
//   the user's other devices (badges sync) and DM peers (read receipts): `unread`
//   events carry each change.

export const BACKOFF_START_MS = 1000;
/** A send answered `unavailable` is resent this many times (0.25 s doubling to 4 s). */
export const UNAVAILABLE_RETRIES = 6;
const UNAVAILABLE_FIRST_DELAY_MS = 250;
const UNAVAILABLE_MAX_DELAY_MS = 4000;
export const BACKOFF_MAX_MS = 30000;
/** Messages kept per room / DM for applying edits, deletes and reactions. */
export const MESSAGES_KEPT = 1000;
/// A connection that stayed up this long resets the backoff.
export const STABLE_MS = 10000;

export class HubbubError extends Error {
  constructor(code, message, command) {
    super(message || code);
    this.name = "HubbubError";
    /** The protocol error code: bad_request, rate_limited, too_large, timeout, closed... */
    this.code = code;
    /** The command that failed, when known. */
    this.command = command;
  }
}

/** Backoff delay before reconnect attempt `attempt` (0-based): 1 s, 2 s, 4 s ... 30 s,
 *  each scaled by a random factor in [0.75, 1.25) and capped at 30 s. */
export function backoffDelay(attempt, random = Math.random) {
  const base = Math.min(BACKOFF_MAX_MS, BACKOFF_START_MS * 2 ** Math.min(attempt, 16));
  return Math.min(BACKOFF_MAX_MS, Math.round(base * (0.75 + random() * 0.5)));
}

function randomId() {
  const c = globalThis.crypto;
  if (c && typeof c.randomUUID === "function") return c.randomUUID();
  return `${Date.now().toString(36)}-${Math.random().toString(36).slice(2)}`;
}

/** Apply one edit, delete or react entry to the message it targets (both plain
 *  objects as the server sends them), in place; returns the message. A message
 *  keeps `text` (after the last edit), `edited_ts`, `deleted` and `reactions`
 *  ({emoji: [user ids]}), the shape of `history` with `current: true`. */
export function applyEntry(message, entry) {
  if (!message || message.seq !== entry.target) return message;
  switch (entry.type) {
    case "edit":
      if (!message.deleted) {
        message.text = entry.text;
        message.edited_ts = entry.ts;
      }
      break;
    case "delete":
      message.deleted = true;
      delete message.text;
      delete message.meta;
      break;
    case "react": {
      const reactions = (message.reactions = message.reactions || {});
      const users = reactions[entry.emoji] || [];
      const i = users.indexOf(entry.user);
      if (entry.on && i < 0) users.push(entry.user);
      if (!entry.on && i >= 0) users.splice(i, 1);
      if (users.length) reactions[entry.emoji] = users;
      else delete reactions[entry.emoji];
      break;
    }
    default:
      break;
  }
  return message;
}

/** "r:<room>" or "d:<peer>": the key of the channel an event or entry is about. */
export function channelKey(ev) {
  return ev.room !== undefined ? `r:${ev.room}` : `d:${ev.dm}`;
}

export class Hubbub {
  /**
   * @param {object} opts
   * @param {string} opts.url        ws:// or wss:// URL of /ws
   * @param {string} [opts.name]     guest name
   * @param {string} [opts.token]    JWT (wins over name)
   * @param {boolean} [opts.batch]   ask the server to batch frames (default true)
   * @param {number} [opts.timeout]  reply timeout in ms (default 10000)
   * @param {boolean} [opts.reconnect] reconnect after unexpected closes (default true)
   * @param {Function} [opts.getToken] async () => a new JWT; called on
   *   `token_expiring` (the SDK refreshes the live connection with it) and before
   *   reconnecting after the token expired (close 4001)
   * @param {Function} [opts.WebSocket] WebSocket constructor (default globalThis.WebSocket)
   * @param {object} [opts.timers]   { setTimeout, clearTimeout, random } for tests
   */
  constructor(opts) {
    this.url = opts.url;
    this.name = opts.name;
    this.token = opts.token;
    this.getToken = opts.getToken;
    this.batch = opts.batch !== false;
    this.timeout = opts.timeout ?? 10000;
    this.autoReconnect = opts.reconnect !== false;
    this.WS = opts.WebSocket || globalThis.WebSocket;
    const t = opts.timers || {};
    this._setTimeout = t.setTimeout || ((f, ms) => setTimeout(f, ms));
    this._clearTimeout = t.clearTimeout || ((h) => clearTimeout(h));
    this._random = t.random || Math.random;

    /** connecting | open | reconnecting | closed */
    this.state = "closed";
    this.user = null;
    this.welcome = null;
    this._ws = null;
    this._nextId = 1;
    this._pending = new Map(); // id -> { resolve, reject, timer, cmd }
    this._rooms = new Map(); // room -> { seq, epoch, history }
    this._dms = new Map(); // peer -> last seq delivered
    this._sendQueue = []; // sends waiting for a connection: { cmd, resolve, reject }
    this._inflight = new Map(); // id -> send entry awaiting ack
    this._handlers = new Map();
    this._attempt = 0;
    this._retryTimer = null;
    this._stableTimer = null;
    this._closedByUser = false;
    this._connectWaiters = [];
    /** While DMs are caught up after a reconnect, live DMs wait here so that the
     *  catch-up (older seqs) is delivered first. */
    this._heldDms = null;
    /** The server's `closing.reconnect_ms`, used for the next reconnect. */
    this._suggestedDelay = null;
    /** channel key -> Map(seq -> message), the last MESSAGES_KEPT messages. */
    this._held = new Map();
    /** channel key -> { room | dm, seq, read, unread, peer_read }: the user's rooms
     *  (joined with persist) and DMs, from `welcome`, kept current. */
    this._unread = new Map();
    this._unreadRefresh = null;
  }

  /** Subscribe to an event: message, edit, delete, react (each with `message`, the
   *  held message after applying it, when held), read (someone read a channel up to
   *  `seq`: the user on another device, or a DM peer), unread (a channel's entry
   *  of unreadState() changed), member, members, typing, error, state, welcome,
   *  closing. `member` is one user joining or leaving a room; in a room
   *  larger than the server's presence-events limit there are none, and `members`
   *  ({ room, count }) carries the room's new member count instead (at most once a
   *  second). Returns a function that unsubscribes. */
  on(event, fn) {
    if (!this._handlers.has(event)) this._handlers.set(event, new Set());
    this._handlers.get(event).add(fn);
    return () => this._handlers.get(event)?.delete(fn);
  }

  _emit(event, payload) {
    for (const fn of this._handlers.get(event) || []) {
      try {
        fn(payload);
      } catch (e) {
        // A failing handler must not break the connection.
        console.error("hubbub handler failed", e);
      }
    }
  }

  _setState(state, extra = {}) {
    this.state = state;
    this._emit("state", { state, ...extra });
  }

  /** Open the connection and say hello. Resolves with `welcome`. */
  connect() {
    this._closedByUser = false;
    if (this.state === "open") return Promise.resolve(this.welcome);
    const p = new Promise((resolve, reject) => this._connectWaiters.push({ resolve, reject }));
    if (this.state === "closed") this._open("connecting");
    return p;
  }

  /** Close for good (no reconnect). Pending commands are rejected. */
  close() {
    this._closedByUser = true;
    this._clearTimers();
    const ws = this._ws;
    this._ws = null;
    if (ws) {
      try {
        ws.close(1000);
      } catch {
        /* already closed */
      }
    }
    this._failPending(new HubbubError("closed", "connection closed by the client"));
    for (const s of this._sendQueue.splice(0)) s.reject(new HubbubError("closed", "client closed"));
    this._setState("closed", { code: 1000, reason: "closed by the client" });
  }

  _clearTimers() {
    if (this._retryTimer) this._clearTimeout(this._retryTimer);
    if (this._stableTimer) this._clearTimeout(this._stableTimer);
    this._retryTimer = this._stableTimer = null;
  }

  _open(state) {
    this._setState(state);
    let ws;
    try {
      ws = new this.WS(this.url);
    } catch (e) {
      this._onClose(null, 1006, String(e));
      return;
    }
    this._ws = ws;
    ws.onopen = () => this._onOpen(ws);
    ws.onmessage = (ev) => this._onFrame(ws, ev.data);
    ws.onclose = (ev) => this._onClose(ws, ev.code, ev.reason);
    ws.onerror = () => {
      /* onclose follows with the code */
    };
  }

  async _onOpen(ws) {
    if (ws !== this._ws) return;
    const hello = { type: "hello", batch: this.batch };
    if (this.token) hello.token = this.token;
    else hello.name = this.name;
    let welcome;
    try {
      welcome = await this._request(hello);
    } catch (e) {
      // unauthorized / bad_request: the server closes (4001 / 4000) right after.
      this._emit("error", e);
      return;
    }
    if (ws !== this._ws) return;
    this.user = welcome.user;
    this.welcome = welcome;
    this._setUnread(welcome);
    this._emit("welcome", welcome);
    this._stableTimer = this._setTimeout(() => {
      this._attempt = 0;
    }, STABLE_MS);
    // Rejoin rooms, then catch up DMs, then flush sends made while away.
    const rejoins = [...this._rooms.entries()].map(([room, r]) =>
      this._joinCmd(room, r.epoch ? { seq: r.seq, epoch: r.epoch } : null, r.history).catch((e) =>
        this._emit("error", e),
      ),
    );
    await Promise.all(rejoins);
    if (ws !== this._ws) return;
    this._heldDms = [];
    const catchUps = [...this._dms.keys()].map((peer) =>
      this._request({ type: "history", dm: peer, limit: 500 })
        .then((h) => this._deliverAll((h.messages || []).map((m) => ({ ...m, _catchUp: true }))))
        .catch((e) => this._emit("error", e)),
    );
    await Promise.all(catchUps);
    const held = this._heldDms || [];
    this._heldDms = null;
    if (ws !== this._ws) return;
    held.sort((a, b) => a.seq - b.seq);
    this._deliverAll(held);
    this._setState("open");
    for (const w of this._connectWaiters.splice(0)) w.resolve(welcome);
    for (const s of this._sendQueue.splice(0)) this._transmitSend(s);
  }

  _onFrame(ws, data) {
    if (ws !== this._ws || typeof data !== "string") return;
    for (const line of data.split("\n")) {
      if (!line) continue;
      let msg;
      try {
        msg = JSON.parse(line);
      } catch {
        continue;
      }
      this._onMessage(msg);
    }
  }

  _onMessage(msg) {
    if (msg.id !== undefined && this._pending.has(msg.id)) {
      const p = this._pending.get(msg.id);
      const entry = this._inflight.get(msg.id);
      this._pending.delete(msg.id);
      this._inflight.delete(msg.id);
      this._clearTimeout(p.timer);
      if (msg.type === "error" && msg.code === "unavailable" && entry && (entry.attempts || 0) < UNAVAILABLE_RETRIES) {
        // The server could not store or publish it right now (e.g. its Redis is
        // down). Send it again, same client_id, so it is stored once either way.
        entry.attempts = (entry.attempts || 0) + 1;
        const delay = Math.min(UNAVAILABLE_MAX_DELAY_MS, UNAVAILABLE_FIRST_DELAY_MS * 2 ** (entry.attempts - 1));
        this._setTimeout(() => {
          if (this.state === "closed") entry.reject(new HubbubError("closed", "client closed", entry.cmd));
          else this._transmitSend(entry);
        }, delay);
        return;
      }
      if (msg.type === "error") p.reject(new HubbubError(msg.code, msg.message, p.cmd));
      else p.resolve(msg);
      return;
    }
    switch (msg.type) {
      case "message":
      case "edit":
      case "delete":
      case "react":
        this._deliver(msg);
        break;
      case "read":
        this._onRead(msg);
        break;
      case "token_expiring":
        this._emit("token_expiring", msg);
        this._refreshToken();
        break;
      case "left":
        // The server took this connection out of a room (a narrower token, the
        // server API): it is not rejoined.
        this._rooms.delete(msg.room);
        this._emit("left", msg);
        break;
      case "member":
      case "members":
      case "typing":
        this._emit(msg.type, msg);
        break;
      case "closing":
        // A draining server suggests when to come back, spread with jitter so that a
        // rolling restart does not bring every client back at once.
        if (Number.isFinite(msg.reconnect_ms)) this._suggestedDelay = Math.min(BACKOFF_MAX_MS, msg.reconnect_ms);
        this._emit("closing", msg);
        break;
      case "error":
        this._emit("error", new HubbubError(msg.code, msg.message));
        break;
      default:
        break;
    }
  }

  /** Deliver a stream entry (message, edit, delete, react) once, in seq order,
   *  per room or DM peer. */
  _deliver(m) {
    if (m.room !== undefined) {
      const r = this._rooms.get(m.room);
      if (!r) return; // a room we left
      if (m.seq <= r.seq) return; // already delivered
      r.seq = m.seq;
    } else if (m.dm !== undefined) {
      if (this._heldDms && !m._catchUp) {
        this._heldDms.push(m);
        return;
      }
      const last = this._dms.get(m.dm) ?? 0;
      if (m.seq <= last) return;
      this._dms.set(m.dm, m.seq);
    }
    if (m._catchUp) {
      m = { ...m };
      delete m._catchUp;
    }
    const key = channelKey(m);
    let held = this._held.get(key);
    if (!held) this._held.set(key, (held = new Map()));
    if (m.type === "message" || m.type === undefined) {
      held.set(m.seq, m);
      if (held.size > MESSAGES_KEPT) held.delete(held.keys().next().value);
      this._countUnread(key, m);
      this._emit("message", m);
      return;
    }
    const message = applyEntry(held.get(m.target), m);
    this._bumpSeq(key, m.seq);
    if (m.type === "delete" && message) this._recount(key);
    this._emit(m.type, { ...m, message });
  }

  /** A new message: the channel's latest seq, and one more unread if from another
   *  user after the read position. */
  _countUnread(key, m) {
    const u = this._unread.get(key);
    if (!u) {
      // A DM is one of the user's channels from its first message.
      if (m.dm === undefined) return;
      this._unread.set(key, { dm: m.dm, seq: m.seq, read: 0, unread: m.from !== this.user ? 1 : 0 });
    } else {
      u.seq = Math.max(u.seq, m.seq);
      if (m.from !== this.user && m.seq > u.read && !m.deleted) u.unread += 1;
    }
    this._emit("unread", { key, ...this._unread.get(key) });
  }

  _bumpSeq(key, seq) {
    const u = this._unread.get(key);
    if (u) u.seq = Math.max(u.seq, seq);
  }

  /** Ask the server for exact counts (after a change the SDK cannot count itself,
   *  such as a read that stops short of the latest message, or a delete). */
  _recount(key) {
    if (!this._unread.has(key) || this._unreadRefresh) return;
    this._unreadRefresh = this._setTimeout(() => {
      this._unreadRefresh = null;
      this.refreshUnread().catch(() => {});
    }, 200);
  }

  _setUnread(list) {
    const seen = new Set();
    for (const r of list.rooms || []) {
      const key = `r:${r.room}`;
      seen.add(key);
      this._unread.set(key, { ...r });
      this._emit("unread", { key, ...r });
    }
    for (const d of list.dms || []) {
      const key = `d:${d.dm}`;
      seen.add(key);
      this._unread.set(key, { ...d });
      this._emit("unread", { key, ...d });
    }
    for (const key of [...this._unread.keys()]) {
      if (!seen.has(key)) this._unread.delete(key);
    }
  }

  /** Someone read a channel: this user on another device (the badge follows), or
   *  the DM's peer (a read receipt: `peer_read`). */
  _onRead(ev) {
    const key = channelKey(ev);
    const u = this._unread.get(key);
    if (ev.user === this.user) {
      if (u && ev.seq > u.read) {
        u.read = ev.seq;
        if (u.read >= u.seq) u.unread = 0;
        else this._recount(key);
        this._emit("unread", { key, ...u });
      }
    } else if (u) {
      u.peer_read = Math.max(u.peer_read || 0, ev.seq);
      this._emit("unread", { key, ...u });
    }
    this._emit("read", ev);
  }

  _deliverAll(messages) {
    for (const m of messages || []) this._deliver(m);
  }

  /** Ask the app for a new token and swap it in on the live connection. */
  async _refreshToken() {
    if (!this.getToken || this._refreshing) return;
    this._refreshing = true;
    try {
      const token = await this.getToken();
      if (!token) return;
      await this.refresh(token);
    } catch (e) {
      this._emit("error", e instanceof HubbubError ? e : new HubbubError("refresh_failed", String(e?.message || e)));
    } finally {
      this._refreshing = false;
    }
  }

  /** Swap the connection's token for `token` (same user); resolves with
   *  `refreshed`. Rooms the new token does not allow are left (`left` events). */
  async refresh(token) {
    const r = await this._request({ type: "refresh", token });
    this.token = token;
    this._emit("refreshed", r);
    return r;
  }

  _onClose(ws, code, reason) {
    if (ws && ws !== this._ws) return;
    this._ws = null;
    this._heldDms = null;
    if (this._stableTimer) this._clearTimeout(this._stableTimer);
    this._stableTimer = null;
    // Commands other than sends fail; sends wait to be retransmitted.
    for (const [id, p] of this._pending) {
      this._clearTimeout(p.timer);
      const entry = this._inflight.get(id);
      if (entry) {
        this._inflight.delete(id);
        this._sendQueue.unshift(entry);
      } else {
        p.reject(new HubbubError("closed", `connection closed (${code})`, p.cmd));
      }
    }
    this._pending.clear();
    if (this._closedByUser) return;
    if (code === 4001 && this.getToken && this.autoReconnect && /expired/.test(reason || "")) {
      // The token ran out: ask for a new one, then reconnect with it.
      this._setState("reconnecting", { delay: 0, attempt: this._attempt, code, reason });
      Promise.resolve()
        .then(() => this.getToken())
        .then((token) => {
          if (!token) throw new Error("no new token");
          this.token = token;
          if (!this._closedByUser) this._open("connecting");
        })
        .catch((e) => {
          this._failPending(new HubbubError("unauthorized", reason || "unauthorized"));
          for (const s of this._sendQueue.splice(0)) s.reject(new HubbubError("closed", reason || "closed"));
          for (const w of this._connectWaiters.splice(0)) w.reject(new HubbubError("unauthorized", reason));
          this._setState("closed", { code, reason: `${reason}; no new token (${e?.message || e})` });
        });
      return;
    }
    if (code === 4001 || !this.autoReconnect) {
      this._failPending(new HubbubError("unauthorized", reason || "unauthorized"));
      for (const s of this._sendQueue.splice(0)) s.reject(new HubbubError("closed", reason || "closed"));
      for (const w of this._connectWaiters.splice(0)) w.reject(new HubbubError("unauthorized", reason));
      this._setState("closed", { code, reason });
      return;
    }
    const suggested = this._suggestedDelay;
    this._suggestedDelay = null;
    const delay = suggested ?? backoffDelay(this._attempt, this._random);
    this._attempt += 1;
    this._setState("reconnecting", { delay, attempt: this._attempt, code, reason });
    this._retryTimer = this._setTimeout(() => {
      this._retryTimer = null;
      this._open("connecting");
    }, delay);
  }

  _failPending(err) {
    for (const p of this._pending.values()) {
      this._clearTimeout(p.timer);
      p.reject(err);
    }
    this._pending.clear();
    this._inflight.clear();
  }

  _request(cmd) {
    const ws = this._ws;
    if (!ws || ws.readyState !== 1) {
      return Promise.reject(new HubbubError("closed", "not connected", cmd));
    }
    const id = this._nextId++;
    return new Promise((resolve, reject) => {
      const timer = this._setTimeout(() => {
        this._pending.delete(id);
        this._inflight.delete(id);
        reject(new HubbubError("timeout", `no reply to ${cmd.type} within ${this.timeout} ms`, cmd));
      }, this.timeout);
      this._pending.set(id, { resolve, reject, timer, cmd });
      ws.send(JSON.stringify({ ...cmd, id }));
    });
  }

  async _joinCmd(room, since, history, persist) {
    const cmd = { type: "join", room };
    if (since) cmd.since = since;
    if (history !== undefined) cmd.history = history;
    if (persist) cmd.persist = true;
    const joined = await this._request(cmd);
    const r = this._rooms.get(room) || { seq: 0, epoch: null, history };
    // A different epoch means history was lost: start counting afresh.
    if (r.epoch !== joined.epoch) r.seq = 0;
    r.epoch = joined.epoch;
    this._rooms.set(room, r);
    this._deliverAll(joined.messages);
    // Nothing older than the room's current seq is missing any more.
    if (r.seq < joined.seq && joined.recovered) r.seq = joined.seq;
    return joined;
  }

  /** Join a room (creating it). Resolves with `joined`; its entries are also
   *  delivered through the `message` / `edit` / `delete` / `react` events (once).
   *  With `persist` the room becomes one of the user's rooms on every device
   *  (listed by myRooms() after the next hello). */
  async join(room, { history, persist } = {}) {
    const r = this._rooms.get(room);
    const since = r && r.epoch ? { seq: r.seq, epoch: r.epoch } : null;
    const joined = await this._joinCmd(room, since, history, persist);
    const key = `r:${room}`;
    if (persist && !this._unread.has(key)) {
      this._unread.set(key, { room, seq: joined.seq, read: 0, unread: 0 });
      this._recount(key);
    }
    return joined;
  }

  /** Leave a room; with `persist` it is no longer one of the user's rooms. */
  async leave(room, { persist } = {}) {
    const cmd = { type: "leave", room };
    if (persist) cmd.persist = true;
    const left = await this._request(cmd);
    this._rooms.delete(room);
    if (persist) this._unread.delete(`r:${room}`);
    return left;
  }

  /** The user's rooms (joined with persist on any device), from `welcome`. */
  myRooms() {
    return [...this._unread.values()].filter((u) => u.room !== undefined).map((u) => u.room);
  }

  /** The user's rooms and DMs: [{ key, room | dm, seq, read, unread, peer_read }]. */
  unreadState() {
    return [...this._unread.entries()].map(([key, u]) => ({ key, ...u }));
  }

  /** Fetch exact unread counts from the server; resolves with `unread`. */
  async refreshUnread() {
    const u = await this._request({ type: "unread" });
    this._setUnread(u);
    return u;
  }

  /** Mark `{ room }` or `{ dm }` read up to `seq` (default: its latest seq seen).
   *  The server never moves it backwards; every device of the user (and a DM
   *  peer) hears of it. Resolves with the `read` event. */
  async markRead({ room, dm }, seq) {
    const key = room !== undefined ? `r:${room}` : `d:${dm}`;
    const last = room !== undefined ? this._rooms.get(room)?.seq : this._dms.get(dm);
    const latest = Math.max(last || 0, this._unread.get(key)?.seq || 0);
    const cmd = { type: "read", seq: seq ?? latest };
    if (room !== undefined) cmd.room = room;
    else cmd.dm = dm;
    const ev = await this._request(cmd);
    this._onRead({ ...ev, id: undefined });
    return ev;
  }

  /** The messages held for `{ room }` or `{ dm }`, ascending, in their current
   *  state (edits, deletes and reactions applied). */
  messages({ room, dm }) {
    const held = this._held.get(room !== undefined ? `r:${room}` : `d:${dm}`);
    return held ? [...held.values()].sort((a, b) => a.seq - b.seq) : [];
  }

  _where({ room, dm }, cmd) {
    if (room !== undefined) cmd.room = room;
    else cmd.dm = dm;
    return cmd;
  }

  /** Edit one's own message at `target` in `{ room }` or `{ dm }`. Resolves with
   *  `ack`; queued and retried like a send. */
  edit(where, target, text, { clientId } = {}) {
    const cmd = this._where(where, { type: "edit", target, text });
    if (clientId) cmd.client_id = clientId;
    return this._enqueueSend(cmd);
  }

  /** Delete one's own message at `target`. Resolves with `ack`. */
  deleteMessage(where, target, { clientId } = {}) {
    const cmd = this._where(where, { type: "delete", target });
    if (clientId) cmd.client_id = clientId;
    return this._enqueueSend(cmd);
  }

  /** Add (`on` true) or take back a reaction `emoji` to the message at `target`. */
  react(where, target, emoji, on = true, { clientId } = {}) {
    const cmd = this._where(where, { type: "react", target, emoji, on });
    if (clientId) cmd.client_id = clientId;
    return this._enqueueSend(cmd);
  }

  /** The rooms this client is in (rejoined automatically after a reconnect). */
  rooms() {
    return [...this._rooms.keys()];
  }

  _enqueueSend(cmd) {
    if (!cmd.client_id) cmd.client_id = randomId();
    return new Promise((resolve, reject) => {
      const entry = { cmd, resolve, reject };
      if (this.state === "open" && this._ws && this._ws.readyState === 1) this._transmitSend(entry);
      else this._sendQueue.push(entry);
    });
  }

  _transmitSend(entry) {
    const ws = this._ws;
    if (!ws || ws.readyState !== 1) {
      this._sendQueue.push(entry);
      return;
    }
    const id = this._nextId++;
    const timer = this._setTimeout(() => {
      this._pending.delete(id);
      this._inflight.delete(id);
      entry.reject(new HubbubError("timeout", `no ack within ${this.timeout} ms`, entry.cmd));
    }, this.timeout);
    this._pending.set(id, { resolve: entry.resolve, reject: entry.reject, timer, cmd: entry.cmd });
    // Until answered, a send is retransmitted (same client_id) if the connection drops.
    this._inflight.set(id, entry);
    ws.send(JSON.stringify({ ...entry.cmd, id }));
  }

  /** Send to a room. Resolves with `ack` once stored. Queued while disconnected. */
  send(room, text, { meta, clientId } = {}) {
    const cmd = { type: "send", room, text };
    if (meta) cmd.meta = meta;
    if (clientId) cmd.client_id = clientId;
    return this._enqueueSend(cmd);
  }

  /** Direct message to a user. Resolves with `ack`. Queued while disconnected. */
  direct(to, text, { meta, clientId } = {}) {
    const cmd = { type: "direct", to, text };
    if (meta) cmd.meta = meta;
    if (clientId) cmd.client_id = clientId;
    if (!this._dms.has(to)) this._dms.set(to, 0);
    return this._enqueueSend(cmd);
  }

  /** Older entries: { room } or { dm }, optional before (exclusive seq), limit;
   *  with `current: true`, messages only, each in its current state. */
  async history({ room, dm, before, limit, current } = {}) {
    const cmd = { type: "history" };
    if (current) cmd.current = true;
    if (room !== undefined) cmd.room = room;
    if (dm !== undefined) {
      cmd.dm = dm;
      if (!this._dms.has(dm)) this._dms.set(dm, 0);
    }
    if (before !== undefined) cmd.before = before;
    if (limit !== undefined) cmd.limit = limit;
    return this._request(cmd);
  }

  /** One page of a room's members, by user id: { members, member_count, next }.
   *  Pass the previous page's `next` as `after` for the page that follows it; the
   *  last page has no `next`. `limit` is at most 1000 (the default). */
  presence(room, { after, limit } = {}) {
    const cmd = { type: "presence", room };
    if (after !== undefined) cmd.after = after;
    if (limit !== undefined) cmd.limit = limit;
    return this._request(cmd);
  }

  /** Every member of a room, fetched page by page (`limit` per page). */
  async allMembers(room, { limit } = {}) {
    const out = [];
    let after;
    for (;;) {
      const page = await this.presence(room, { after, limit });
      out.push(...page.members);
      if (page.next === undefined) return out;
      after = page.next;
    }
  }

  /** Tell the room you are typing (fire and forget; never stored). */
  typing(room) {
    const ws = this._ws;
    if (ws && ws.readyState === 1 && this.state === "open") {
      ws.send(JSON.stringify({ type: "typing", room }));
    }
  }

  ping() {
    return this._request({ type: "ping" });
  }
}
