// Unit tests of the SDK's reconnect, resend and dedupe logic, under Node's built-in
// test runner. The socket and the clock are scripted here so that timing is exact;
// the same SDK against the real server is exercised by the browser tests in e2e/.
import { test } from "node:test";
import assert from "node:assert/strict";
import { Hubbub, HubbubError, applyEntry, backoffDelay, BACKOFF_MAX_MS, STABLE_MS } from "../hubbub.js";

/** A WebSocket stand-in that records what the SDK sends and lets a test play the server. */
class FakeSocket {
  static all = [];
  constructor(url) {
    this.url = url;
    this.readyState = 0;
    this.sent = [];
    FakeSocket.all.push(this);
  }
  send(data) {
    this.sent.push(JSON.parse(data));
  }
  close(code = 1000) {
    this.readyState = 3;
    this.closedWith = code;
  }
  // --- the test's side ---
  open() {
    this.readyState = 1;
    this.onopen?.();
  }
  push(...objs) {
    this.onmessage?.({ data: objs.map((o) => JSON.stringify(o)).join("\n") });
  }
  drop(code = 1006, reason = "") {
    this.readyState = 3;
    this.onclose?.({ code, reason });
  }
  last(type) {
    return [...this.sent].reverse().find((c) => c.type === type);
  }
  all(type) {
    return this.sent.filter((c) => c.type === type);
  }
}

/** A manual clock. */
function clock() {
  let now = 0;
  let timers = [];
  let seq = 0;
  return {
    setTimeout(fn, ms) {
      const t = { at: now + ms, fn, id: ++seq };
      timers.push(t);
      return t.id;
    },
    clearTimeout(id) {
      timers = timers.filter((t) => t.id !== id);
    },
    random: () => 0.5, // jitter factor exactly 1.0
    async advance(ms) {
      const until = now + ms;
      for (;;) {
        timers.sort((a, b) => a.at - b.at);
        const t = timers[0];
        if (!t || t.at > until) break;
        timers.shift();
        now = t.at;
        t.fn();
        await settle();
      }
      now = until;
    },
  };
}

const settle = () => new Promise((r) => setImmediate(r));

function newClient(c, extra = {}) {
  FakeSocket.all = [];
  return new Hubbub({ url: "ws://x/ws", name: "alice", WebSocket: FakeSocket, timers: c, ...extra });
}

/** Answer the hello on socket `ws` and let the SDK finish its reconnect steps. */
async function welcome(ws, extra = {}) {
  ws.open();
  await settle();
  const hello = ws.last("hello");
  ws.push({ type: "welcome", id: hello.id, user: "alice", conn: "1", heartbeat_ms: 25000, limits: {}, ...extra });
  await settle();
}

async function answerJoin(ws, room, body) {
  const j = ws.all("join").find((c) => c.room === room && !c._answered);
  assert.ok(j, `a join of ${room} was sent`);
  j._answered = true;
  ws.push({ type: "joined", id: j.id, room, epoch: "E1", members: [], recovered: false, ...body });
  await settle();
}

test("backoff doubles from 1 s to a 30 s cap", () => {
  const one = () => 0.5;
  assert.deepEqual(
    [0, 1, 2, 3, 4, 5, 6, 10].map((a) => backoffDelay(a, one)),
    [1000, 2000, 4000, 8000, 16000, 30000, 30000, 30000],
  );
});

test("backoff jitter stays within 75%..125% and never exceeds the cap", () => {
  for (let a = 0; a < 8; a++) {
    for (const r of [0, 0.25, 0.999]) {
      const d = backoffDelay(a, () => r);
      const base = Math.min(30000, 1000 * 2 ** a);
      assert.ok(d >= base * 0.75 - 1 && d <= Math.min(BACKOFF_MAX_MS, base * 1.25), `${a} ${r} ${d}`);
    }
  }
  assert.notEqual(backoffDelay(2, () => 0), backoffDelay(2, () => 0.99), "random factor applies");
});

test("connect says hello with batch and resolves with welcome", async () => {
  const c = clock();
  const hub = newClient(c);
  const states = [];
  hub.on("state", (s) => states.push(s.state));
  const p = hub.connect();
  const ws = FakeSocket.all[0];
  await welcome(ws);
  const w = await p;
  assert.equal(w.user, "alice");
  assert.deepEqual(ws.sent[0], { type: "hello", batch: true, name: "alice", id: 1 });
  assert.deepEqual(states, ["connecting", "open"]);
});

test("a token is sent instead of the name", async () => {
  const c = clock();
  const hub = newClient(c, { token: "T" });
  hub.connect();
  FakeSocket.all[0].open();
  await settle();
  assert.equal(FakeSocket.all[0].last("hello").token, "T");
  assert.equal(FakeSocket.all[0].last("hello").name, undefined);
});

test("an unexpected close reconnects with backoff, says hello again and rejoins with since", async () => {
  const c = clock();
  const hub = newClient(c);
  const states = [];
  hub.on("state", (s) => states.push([s.state, s.delay]));
  hub.connect();
  let ws = FakeSocket.all[0];
  await welcome(ws);
  const joined = hub.join("lobby");
  await settle();
  await answerJoin(ws, "lobby", { seq: 2, messages: [{ type: "message", room: "lobby", seq: 1 }, { type: "message", room: "lobby", seq: 2 }] });
  await joined;
  ws.push({ type: "message", room: "lobby", seq: 3, text: "live" });
  ws.drop(1006);
  assert.deepEqual(states.at(-1), ["reconnecting", 1000]);
  await c.advance(999);
  assert.equal(FakeSocket.all.length, 1, "no reconnect before the delay");
  await c.advance(1);
  assert.equal(FakeSocket.all.length, 2);
  ws = FakeSocket.all[1];
  await welcome(ws);
  const rejoin = ws.last("join");
  assert.deepEqual(rejoin.since, { seq: 3, epoch: "E1" }, "since = last seq delivered");
});

test("failed reconnects back off 1, 2, 4, 8 s", async () => {
  const c = clock();
  const hub = newClient(c);
  const delays = [];
  hub.on("state", (s) => s.state === "reconnecting" && delays.push(s.delay));
  hub.connect();
  await welcome(FakeSocket.all[0]);
  FakeSocket.all[0].drop(1001);
  for (let i = 1; i <= 3; i++) {
    await c.advance(delays.at(-1));
    FakeSocket.all[i].drop(1006); // the server is still down
  }
  assert.deepEqual(delays, [1000, 2000, 4000, 8000]);
});

test("a connection that stays up resets the backoff", async () => {
  const c = clock();
  const hub = newClient(c);
  const delays = [];
  hub.on("state", (s) => s.state === "reconnecting" && delays.push(s.delay));
  hub.connect();
  await welcome(FakeSocket.all[0]);
  FakeSocket.all[0].drop(1006);
  await c.advance(1000);
  FakeSocket.all[1].drop(1006);
  await c.advance(2000);
  await welcome(FakeSocket.all[2]);
  await c.advance(STABLE_MS);
  FakeSocket.all[2].drop(1006);
  assert.deepEqual(delays, [1000, 2000, 1000]);
});

test("close 4001 does not reconnect and rejects waiting sends", async () => {
  const c = clock();
  const hub = newClient(c);
  const states = [];
  hub.on("state", (s) => states.push(s.state));
  hub.connect();
  await welcome(FakeSocket.all[0]);
  FakeSocket.all[0].drop(1006);
  const queued = assert.rejects(hub.send("lobby", "never"), (e) => e instanceof HubbubError);
  await c.advance(1000);
  FakeSocket.all[1].drop(4001, "token expired");
  await queued;
  await c.advance(60000);
  assert.equal(FakeSocket.all.length, 2, "no further attempts");
  assert.equal(states.at(-1), "closed");
});

test("messages are delivered once and in order across joined and live events", async () => {
  const c = clock();
  const hub = newClient(c);
  const got = [];
  hub.on("message", (m) => got.push(m.seq));
  hub.connect();
  let ws = FakeSocket.all[0];
  await welcome(ws);
  hub.join("r");
  await settle();
  await answerJoin(ws, "r", { seq: 2, messages: [{ type: "message", room: "r", seq: 1 }, { type: "message", room: "r", seq: 2 }] });
  ws.push({ type: "message", room: "r", seq: 2 }, { type: "message", room: "r", seq: 3 });
  ws.drop(1006);
  await c.advance(1000);
  ws = FakeSocket.all[1];
  await welcome(ws);
  // The rejoin's messages overlap with what was already delivered.
  await answerJoin(ws, "r", {
    seq: 5,
    recovered: true,
    messages: [3, 4, 5].map((seq) => ({ type: "message", room: "r", seq })),
  });
  ws.push({ type: "message", room: "r", seq: 5 }, { type: "message", room: "r", seq: 6 });
  assert.deepEqual(got, [1, 2, 3, 4, 5, 6]);
});

test("a new epoch starts the room's count afresh", async () => {
  const c = clock();
  const hub = newClient(c);
  const got = [];
  hub.on("message", (m) => got.push(m.seq));
  hub.connect();
  let ws = FakeSocket.all[0];
  await welcome(ws);
  hub.join("r");
  await settle();
  await answerJoin(ws, "r", { seq: 9, messages: [{ type: "message", room: "r", seq: 9 }] });
  ws.drop(1001);
  await c.advance(1000);
  ws = FakeSocket.all[1];
  await welcome(ws);
  await answerJoin(ws, "r", { epoch: "E2", seq: 1, messages: [{ type: "message", room: "r", seq: 1 }] });
  assert.deepEqual(got, [9, 1]);
});

test("a send made while disconnected is queued with a client_id and sent once after reconnecting", async () => {
  const c = clock();
  const hub = newClient(c);
  hub.connect();
  await welcome(FakeSocket.all[0]);
  FakeSocket.all[0].drop(1006);
  const p = hub.send("r", "offline text");
  await c.advance(1000);
  const ws = FakeSocket.all[1];
  await welcome(ws);
  const sends = ws.all("send");
  assert.equal(sends.length, 1);
  assert.equal(sends[0].text, "offline text");
  assert.ok(sends[0].client_id && sends[0].client_id.length <= 64);
  ws.push({ type: "ack", id: sends[0].id, room: "r", seq: 7, ts: 1 });
  assert.equal((await p).seq, 7);
});

test("a send in flight when the connection drops is resent with the same client_id", async () => {
  const c = clock();
  const hub = newClient(c);
  hub.connect();
  let ws = FakeSocket.all[0];
  await welcome(ws);
  const p = hub.send("r", "maybe stored", { clientId: "cid-1" });
  assert.equal(ws.all("send").length, 1);
  ws.drop(1006); // no ack arrived
  await c.advance(1000);
  ws = FakeSocket.all[1];
  await welcome(ws);
  const again = ws.all("send");
  assert.equal(again.length, 1);
  assert.equal(again[0].client_id, "cid-1");
  ws.push({ type: "ack", id: again[0].id, room: "r", seq: 3, ts: 1 });
  assert.equal((await p).seq, 3);
});

test("a send answered unavailable is resent with the same client_id until acked", async () => {
  const c = clock();
  const hub = newClient(c);
  hub.connect();
  const ws = FakeSocket.all[0];
  await welcome(ws);
  const p = hub.send("r", "through an outage", { clientId: "cid-u" });
  const first = ws.last("send");
  ws.push({ type: "error", id: first.id, code: "unavailable", message: "redis down" });
  await c.advance(250);
  const second = ws.last("send");
  assert.notEqual(second.id, first.id);
  assert.equal(second.client_id, "cid-u");
  ws.push({ type: "ack", id: second.id, room: "r", seq: 9, ts: 1 });
  assert.equal((await p).seq, 9);
  assert.equal(ws.all("send").length, 2);
});

test("a send still unavailable after every retry is rejected with unavailable", async () => {
  const c = clock();
  const hub = newClient(c, { timeout: 60000 });
  hub.connect();
  const ws = FakeSocket.all[0];
  await welcome(ws);
  const p = hub.send("r", "never", { clientId: "cid-n" });
  const rejected = assert.rejects(p, (e) => e.code === "unavailable");
  for (let i = 0; i <= 6; i++) {
    ws.push({ type: "error", id: ws.last("send").id, code: "unavailable", message: "down" });
    await c.advance(4000);
  }
  await rejected;
  assert.equal(ws.all("send").length, 7, "the first try and six resends");
});

test("an acked send is not resent after a reconnect", async () => {
  const c = clock();
  const hub = newClient(c);
  hub.connect();
  let ws = FakeSocket.all[0];
  await welcome(ws);
  const p = hub.send("r", "done");
  ws.push({ type: "ack", id: ws.last("send").id, room: "r", seq: 1, ts: 1 });
  await p;
  ws.drop(1006);
  await c.advance(1000);
  ws = FakeSocket.all[1];
  await welcome(ws);
  assert.equal(ws.all("send").length, 0);
});

test("a command without a reply times out with code timeout", async () => {
  const c = clock();
  const hub = newClient(c, { timeout: 500 });
  hub.connect();
  await welcome(FakeSocket.all[0]);
  const rejected = assert.rejects(hub.presence("r"), (e) => e.code === "timeout");
  await c.advance(500);
  await rejected;
});

test("a server error rejects the command with its code", async () => {
  const c = clock();
  const hub = newClient(c);
  hub.connect();
  const ws = FakeSocket.all[0];
  await welcome(ws);
  const p = hub.send("r", "x");
  ws.push({ type: "error", id: ws.last("send").id, code: "not_joined", message: "join first" });
  await assert.rejects(p, (e) => e.code === "not_joined" && e.message === "join first");
});

test("DMs missed while away are caught up from history before live ones, once each", async () => {
  const c = clock();
  const hub = newClient(c);
  const got = [];
  hub.on("message", (m) => got.push([m.dm, m.seq]));
  hub.connect();
  let ws = FakeSocket.all[0];
  await welcome(ws);
  ws.push({ type: "message", dm: "bob", seq: 1, text: "a" });
  ws.drop(1006);
  await c.advance(1000);
  ws = FakeSocket.all[1];
  await welcome(ws);
  const h = ws.last("history");
  assert.equal(h.dm, "bob");
  // A live DM overtakes the history reply.
  ws.push({ type: "message", dm: "bob", seq: 4 });
  ws.push({ type: "history", id: h.id, dm: "bob", messages: [1, 2, 3].map((seq) => ({ type: "message", dm: "bob", seq })) });
  await settle();
  assert.deepEqual(got, [["bob", 1], ["bob", 2], ["bob", 3], ["bob", 4]]);
});

test("close() stops everything and rejects pending commands", async () => {
  const c = clock();
  const hub = newClient(c);
  hub.connect();
  await welcome(FakeSocket.all[0]);
  const rejected = assert.rejects(hub.ping(), (e) => e.code === "closed");
  hub.close();
  await rejected;
  await c.advance(60000);
  assert.equal(FakeSocket.all.length, 1);
  assert.equal(hub.state, "closed");
});

test("a closing with reconnect_ms sets the next reconnect delay", async () => {
  const c = clock();
  const hub = newClient(c);
  const delays = [];
  hub.on("state", (s) => s.state === "reconnecting" && delays.push(s.delay));
  hub.connect();
  await welcome(FakeSocket.all[0]);
  FakeSocket.all[0].push({ type: "closing", reason: "server shutting down", reconnect_ms: 3456 });
  FakeSocket.all[0].drop(1001);
  await c.advance(3455);
  assert.equal(FakeSocket.all.length, 1, "waits the suggested delay");
  await c.advance(1);
  assert.equal(FakeSocket.all.length, 2);
  FakeSocket.all[1].drop(1006);
  assert.deepEqual(delays, [3456, 2000], "then back to the backoff sequence");
});

test("allMembers follows presence pages by next until the last one", async () => {
  const c = clock();
  const hub = newClient(c);
  hub.connect();
  const ws = FakeSocket.all[0];
  await welcome(ws);
  const all = hub.allMembers("big", { limit: 2 });
  await settle();
  let p = ws.last("presence");
  assert.deepEqual([p.room, p.after, p.limit], ["big", undefined, 2]);
  ws.push({ type: "presence", id: p.id, room: "big", member_count: 3, next: "b", members: [{ user: "a" }, { user: "b" }] });
  await settle();
  p = ws.last("presence");
  assert.equal(p.after, "b");
  ws.push({ type: "presence", id: p.id, room: "big", member_count: 3, members: [{ user: "c" }] });
  assert.deepEqual((await all).map((m) => m.user), ["a", "b", "c"]);
});

test("a members count event reaches its handlers", async () => {
  const c = clock();
  const hub = newClient(c);
  const counts = [];
  hub.on("members", (e) => counts.push([e.room, e.count]));
  hub.connect();
  const ws = FakeSocket.all[0];
  await welcome(ws);
  ws.push({ type: "members", room: "big", count: 1500 });
  assert.deepEqual(counts, [["big", 1500]]);
});

// ---------------------------------------------------------------- chat state (1.1)

const msg = (seq, from, text) => ({ type: "message", room: "r", seq, ts: seq, from, name: from, text });

test("applyEntry: an edit replaces the text and sets edited_ts", () => {
  const m = msg(1, "bob", "helo");
  applyEntry(m, { type: "edit", room: "r", seq: 2, target: 1, ts: 20, from: "bob", text: "hello" });
  assert.equal(m.text, "hello");
  assert.equal(m.edited_ts, 20);
});

test("applyEntry: a delete leaves a tombstone without text", () => {
  const m = { ...msg(1, "bob", "oops"), meta: { a: 1 } };
  applyEntry(m, { type: "delete", room: "r", seq: 2, target: 1, ts: 20, from: "bob" });
  assert.equal(m.deleted, true);
  assert.equal(m.text, undefined);
  assert.equal(m.meta, undefined);
});

test("applyEntry: reactions add and take back per user, dropping empty emoji", () => {
  const m = msg(1, "bob", "party");
  const r = (user, emoji, on) => ({ type: "react", room: "r", seq: 9, target: 1, user, emoji, on });
  applyEntry(m, r("bob", "🎉", true));
  applyEntry(m, r("carol", "🎉", true));
  applyEntry(m, r("carol", "🎉", true)); // twice is once
  applyEntry(m, r("bob", "👍", true));
  applyEntry(m, r("bob", "👍", false));
  assert.deepEqual(m.reactions, { "🎉": ["bob", "carol"] });
});

test("applyEntry: an entry for another message changes nothing", () => {
  const m = msg(1, "bob", "x");
  applyEntry(m, { type: "edit", room: "r", seq: 5, target: 4, ts: 1, from: "bob", text: "y" });
  assert.equal(m.text, "x");
});

test("live edit, delete and react entries are applied to held messages and emitted", async () => {
  const c = clock();
  const hub = newClient(c);
  const p = hub.connect();
  await welcome(FakeSocket.all[0]);
  await p;
  const ws = FakeSocket.all[0];
  const j = hub.join("r");
  await answerJoin(ws, "r", { seq: 1, messages: [msg(1, "bob", "first")] });
  await j;
  const seen = [];
  for (const t of ["edit", "delete", "react"]) hub.on(t, (e) => seen.push([t, e.seq, e.message?.text, e.message?.deleted]));
  ws.push(
    { type: "edit", room: "r", seq: 2, target: 1, ts: 2, from: "bob", name: "bob", text: "second" },
    { type: "react", room: "r", seq: 3, target: 1, ts: 3, user: "alice", name: "alice", emoji: "👍", on: true },
    { type: "delete", room: "r", seq: 4, target: 1, ts: 4, from: "bob", name: "bob" },
    { type: "edit", room: "r", seq: 2, target: 1, ts: 2, from: "bob", name: "bob", text: "again" }, // a duplicate
  );
  await settle();
  assert.deepEqual(seen, [
    ["edit", 2, "second", undefined],
    ["react", 3, "second", undefined],
    ["delete", 4, undefined, true],
  ]);
  const [held] = hub.messages({ room: "r" });
  assert.equal(held.deleted, true);
  assert.deepEqual(held.reactions, { "👍": ["alice"] });
});

test("welcome's rooms are myRooms, and messages from others count as unread", async () => {
  const c = clock();
  const hub = newClient(c);
  const p = hub.connect();
  await welcome(FakeSocket.all[0], { rooms: [{ room: "team", seq: 4, read: 2, unread: 2 }], dms: [] });
  await p;
  assert.deepEqual(hub.myRooms(), ["team"]);
  const ws = FakeSocket.all[0];
  const j = hub.join("team");
  await answerJoin(ws, "team", { seq: 4, messages: [] });
  await j;
  const events = [];
  hub.on("unread", (u) => events.push(u.unread));
  ws.push({ ...msg(5, "bob", "new"), room: "team" }, { ...msg(6, "alice", "mine"), room: "team" });
  await settle();
  assert.deepEqual(events, [3, 3], "one more for bob's message, none for the user's own");
  assert.equal(hub.unreadState()[0].seq, 6);
});

test("a read from another device clears the badge; a DM peer's read is a receipt", async () => {
  const c = clock();
  const hub = newClient(c);
  const p = hub.connect();
  await welcome(FakeSocket.all[0], {
    rooms: [{ room: "team", seq: 4, read: 2, unread: 2 }],
    dms: [{ dm: "bob", seq: 3, read: 3, unread: 0, peer_read: 1 }],
  });
  await p;
  const ws = FakeSocket.all[0];
  const reads = [];
  hub.on("read", (r) => reads.push(r.user));
  ws.push(
    { type: "read", room: "team", seq: 4, user: "alice" },
    { type: "read", dm: "bob", seq: 3, user: "bob" },
  );
  await settle();
  const state = Object.fromEntries(hub.unreadState().map((u) => [u.key, u]));
  assert.equal(state["r:team"].unread, 0);
  assert.equal(state["r:team"].read, 4);
  assert.equal(state["d:bob"].peer_read, 3);
  assert.deepEqual(reads, ["alice", "bob"]);
});

test("markRead sends read with the latest seq seen and applies the answer", async () => {
  const c = clock();
  const hub = newClient(c);
  const p = hub.connect();
  await welcome(FakeSocket.all[0], { rooms: [{ room: "team", seq: 2, read: 0, unread: 2 }] });
  await p;
  const ws = FakeSocket.all[0];
  const j = hub.join("team");
  await answerJoin(ws, "team", { seq: 2, messages: [{ ...msg(1, "bob", "a"), room: "team" }, { ...msg(2, "bob", "b"), room: "team" }] });
  await j;
  const done = hub.markRead({ room: "team" });
  await settle();
  const cmd = ws.last("read");
  assert.deepEqual([cmd.room, cmd.seq], ["team", 2]);
  ws.push({ type: "read", id: cmd.id, room: "team", seq: 2, user: "alice" });
  await done;
  assert.equal(hub.unreadState()[0].unread, 0);
});

test("edit, deleteMessage and react go out like sends, each with a client_id", async () => {
  const c = clock();
  const hub = newClient(c);
  const p = hub.connect();
  await welcome(FakeSocket.all[0]);
  await p;
  const ws = FakeSocket.all[0];
  hub.edit({ room: "r" }, 1, "fixed");
  hub.deleteMessage({ dm: "bob" }, 2);
  hub.react({ room: "r" }, 1, "👍", false);
  await settle();
  const [e, d, r] = [ws.last("edit"), ws.last("delete"), ws.last("react")];
  assert.deepEqual([e.room, e.target, e.text], ["r", 1, "fixed"]);
  assert.deepEqual([d.dm, d.target], ["bob", 2]);
  assert.deepEqual([r.emoji, r.on], ["👍", false]);
  for (const cmd of [e, d, r]) assert.ok(cmd.client_id, `${cmd.type} has a client_id`);
});

// ---------------------------------------------------------------- live tokens (1.1)

test("token_expiring: getToken is asked and the live connection is refreshed with it", async () => {
  const c = clock();
  let asked = 0;
  const hub = newClient(c, { token: "t1", name: undefined, getToken: async () => `t${++asked + 1}` });
  const p = hub.connect();
  await welcome(FakeSocket.all[0]);
  await p;
  const ws = FakeSocket.all[0];
  assert.equal(ws.last("hello").token, "t1");
  const refreshed = [];
  hub.on("refreshed", (r) => refreshed.push(r.exp));
  ws.push({ type: "token_expiring", exp: 100 });
  await settle();
  const cmd = ws.last("refresh");
  assert.equal(cmd.token, "t2");
  ws.push({ type: "refreshed", id: cmd.id, exp: 200 });
  await settle();
  assert.deepEqual(refreshed, [200]);
  assert.equal(hub.token, "t2");
  assert.equal(asked, 1);
});

test("after close 4001 for an expired token, getToken is asked and the SDK reconnects with it", async () => {
  const c = clock();
  const hub = newClient(c, { token: "old", name: undefined, getToken: async () => "new" });
  const p = hub.connect();
  await welcome(FakeSocket.all[0]);
  await p;
  FakeSocket.all[0].drop(4001, "token expired");
  await settle();
  await settle();
  assert.equal(FakeSocket.all.length, 2, "a new connection is opened");
  FakeSocket.all[1].open();
  await settle();
  assert.equal(FakeSocket.all[1].last("hello").token, "new");
});

test("after close 4001 for another reason the SDK stays closed even with getToken", async () => {
  const c = clock();
  const hub = newClient(c, { token: "old", name: undefined, getToken: async () => "new" });
  const p = hub.connect();
  await welcome(FakeSocket.all[0]);
  await p;
  const states = [];
  hub.on("state", (s) => states.push(s.state));
  FakeSocket.all[0].drop(4001, "token revoked");
  await settle();
  await c.advance(60000);
  assert.equal(FakeSocket.all.length, 1, "no reconnect");
  assert.deepEqual(states, ["closed"]);
});

test("a room the server takes the connection out of is not rejoined", async () => {
  const c = clock();
  const hub = newClient(c);
  const p = hub.connect();
  await welcome(FakeSocket.all[0]);
  await p;
  const ws = FakeSocket.all[0];
  const j = hub.join("other");
  await answerJoin(ws, "other", { seq: 0, messages: [] });
  await j;
  const left = [];
  hub.on("left", (l) => left.push(l.reason));
  ws.push({ type: "left", room: "other", reason: "forbidden" });
  await settle();
  assert.deepEqual(hub.rooms(), []);
  assert.deepEqual(left, ["forbidden"]);
});
