// Hubbub admin console: the server API (/api/v1) in a page. No build step, no
// CDN, no charting library (the charts are a few SVG polylines). User text is only
// ever set as textContent, never as HTML.

const $ = (id) => document.getElementById(id);
const API = "/api/v1";
const KEY = "hubbub-admin-key"; // sessionStorage: this tab only
const HISTORY = 300; // samples kept for the charts: 10 minutes at one per 2 s

let key = sessionStorage.getItem(KEY) || "";
let timer = null;
const series = { connections: [], messages_per_sec: [], deliveries_per_sec: [], commit_p99_ms: [] };
let roomsAfter = []; // the `after` of each page shown, for paging back to the first
let roomsNext = null;
let currentRoom = null;
let membersNext = null;
let currentUser = null;

/** Call the API; resolves to the JSON body or throws an Error with the API's message. */
async function api(method, path, body) {
  const headers = { Authorization: `Bearer ${key}` };
  const init = { method, headers };
  if (body !== undefined) {
    headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  let res;
  try {
    res = await fetch(API + path, init);
  } catch (e) {
    throw new Error(`the server did not answer (${e.message})`);
  }
  const json = await res.json().catch(() => null);
  if (!res.ok) {
    const err = new Error(json?.error ? `${json.error.code}: ${json.error.message}` : `HTTP ${res.status}`);
    err.status = res.status;
    throw err;
  }
  return json;
}

function showError(msg) {
  $("action-ok").textContent = "";
  $("action-error").textContent = msg;
}
function showOk(msg) {
  $("action-error").textContent = "";
  $("action-ok").textContent = msg;
}

/** Ask before doing `what`; run `action` and report its outcome. */
async function confirmed(what, action) {
  if (!window.confirm(what)) return;
  try {
    const msg = await action();
    showOk(msg);
  } catch (e) {
    showError(e.message);
  }
}

// --- login ---

async function openConsole(candidate) {
  key = candidate;
  try {
    await api("GET", "/stats");
  } catch (e) {
    key = "";
    sessionStorage.removeItem(KEY);
    $("key-error").textContent = e.status === 401 ? "That key is not accepted." : e.message;
    $("login").hidden = false;
    $("console").hidden = true;
    return;
  }
  sessionStorage.setItem(KEY, key);
  $("key-error").textContent = "";
  $("login").hidden = true;
  $("console").hidden = false;
  refresh();
  timer = setInterval(refresh, 2000);
  loadRooms(null);
}

$("key-form").addEventListener("submit", (ev) => {
  ev.preventDefault();
  openConsole($("api-key").value.trim());
});
$("logout").addEventListener("click", () => {
  sessionStorage.removeItem(KEY);
  key = "";
  clearInterval(timer);
  $("console").hidden = true;
  $("login").hidden = false;
  $("api-key").value = "";
  $("api-key").focus();
});

// --- overview ---

const FIGURES = [
  ["connections", "connections", (v) => v],
  ["users", "users", (v) => v],
  ["rooms", "rooms", (v) => v],
  ["messages_per_sec", "messages in /s", (v) => v.toFixed(1)],
  ["deliveries_per_sec", "deliveries /s", (v) => v.toFixed(0)],
  ["commit_p99_ms", "store commit p99 (ms)", (v) => v.toFixed(1)],
  ["slow_consumer_closes", "slow-consumer closes", (v) => v],
  ["rate_limit_closes", "rate-limit closes", (v) => v],
];

function cell(tag, text) {
  const el = document.createElement(tag);
  el.textContent = String(text);
  return el;
}

function renderFigures(s) {
  const box = $("figures");
  box.replaceChildren(
    ...FIGURES.map(([k, label, fmt]) => {
      const d = document.createElement("div");
      d.className = "figure";
      d.dataset.key = k;
      const v = cell("div", fmt(s[k] ?? 0));
      v.className = "v";
      const l = cell("div", label);
      l.className = "k";
      d.append(v, l);
      return d;
    }),
  );
  $("nodes").replaceChildren(
    ...s.nodes.map((n) => {
      const tr = document.createElement("tr");
      tr.append(
        cell("td", n.node),
        cell("td", n.state),
        cell("td", n.broker_up ? "up" : "down"),
        cell("td", n.connections),
        cell("td", n.messages_per_sec.toFixed(1)),
        cell("td", n.deliveries_per_sec.toFixed(0)),
      );
      return tr;
    }),
  );
}

const SVG = "http://www.w3.org/2000/svg";
function renderCharts() {
  const box = $("charts");
  box.replaceChildren(
    ...Object.entries(series).map(([k, values]) => {
      const d = document.createElement("div");
      d.className = "chart";
      const label = document.createElement("div");
      label.className = "k";
      const max = Math.max(1, ...values);
      label.append(cell("span", FIGURES.find((f) => f[0] === k)[1]), cell("span", `max ${max.toFixed(1)}`));
      const svg = document.createElementNS(SVG, "svg");
      svg.setAttribute("viewBox", `0 0 ${HISTORY} 60`);
      svg.setAttribute("preserveAspectRatio", "none");
      svg.setAttribute("role", "img");
      svg.setAttribute("aria-label", `${k} over the last 10 minutes`);
      const line = document.createElementNS(SVG, "polyline");
      const offset = HISTORY - values.length;
      line.setAttribute(
        "points",
        values.map((v, i) => `${offset + i},${(58 - (v / max) * 56).toFixed(1)}`).join(" "),
      );
      line.setAttribute("fill", "none");
      line.setAttribute("stroke", "currentColor");
      line.setAttribute("stroke-width", "1.5");
      line.setAttribute("vector-effect", "non-scaling-stroke");
      svg.append(line);
      d.append(label, svg);
      return d;
    }),
  );
}

async function refresh() {
  try {
    const s = await api("GET", "/stats");
    for (const k of Object.keys(series)) {
      series[k].push(s[k] ?? 0);
      if (series[k].length > HISTORY) series[k].shift();
    }
    renderFigures(s);
    renderCharts();
    $("updated").textContent = `updated ${new Date().toLocaleTimeString()}`;
  } catch (e) {
    $("updated").textContent = `not updated: ${e.message}`;
  }
}

// --- rooms ---

async function loadRooms(after) {
  const q = new URLSearchParams({ limit: "20" });
  const prefix = $("rooms-prefix").value.trim();
  if (prefix) q.set("prefix", prefix);
  if (after) q.set("after", after);
  try {
    const page = await api("GET", `/rooms?${q}`);
    roomsNext = page.next ?? null;
    $("rooms-next").disabled = !roomsNext;
    $("rooms").replaceChildren(
      ...page.rooms.map((r) => {
        const tr = document.createElement("tr");
        const open = cell("button", "Open");
        open.type = "button";
        open.setAttribute("aria-label", `Open room ${r.room}`);
        open.addEventListener("click", () => openRoom(r.room));
        const td = document.createElement("td");
        td.append(open);
        tr.append(cell("td", r.room), cell("td", r.seq), cell("td", r.member_count), td);
        return tr;
      }),
    );
    if (page.rooms.length === 0) {
      const tr = document.createElement("tr");
      const td = cell("td", "No rooms.");
      td.colSpan = 4;
      tr.append(td);
      $("rooms").replaceChildren(tr);
    }
  } catch (e) {
    showError(e.message);
  }
}

$("rooms-form").addEventListener("submit", (ev) => {
  ev.preventDefault();
  roomsAfter = [];
  loadRooms(null);
});
$("rooms-first").addEventListener("click", () => {
  roomsAfter = [];
  loadRooms(null);
});
$("rooms-next").addEventListener("click", () => {
  if (!roomsNext) return;
  roomsAfter.push(roomsNext);
  loadRooms(roomsNext);
});

async function openRoom(room) {
  currentRoom = room;
  membersNext = null;
  $("room-view").hidden = false;
  $("room-name").textContent = room;
  $("members").replaceChildren();
  await Promise.all([loadMembers(null), loadMessages()]);
  $("room-view").scrollIntoView({ block: "nearest" });
}

async function loadMembers(after) {
  const room = currentRoom;
  const q = new URLSearchParams({ limit: "50" });
  if (after) q.set("after", after);
  try {
    const page = await api("GET", `/rooms/${encodeURIComponent(room)}/presence?${q}`);
    $("member-count").textContent = `(${page.member_count})`;
    membersNext = page.next ?? null;
    $("members-more").hidden = !membersNext;
    $("members").append(
      ...page.members.map((m) => {
        const li = document.createElement("li");
        const who = cell("span", m.name === m.user ? m.user : `${m.name} (${m.user})`);
        const remove = cell("button", "Remove");
        remove.type = "button";
        remove.setAttribute("aria-label", `Remove ${m.user} from ${room}`);
        remove.addEventListener("click", () =>
          confirmed(`Remove ${m.user} from room ${room}?`, async () => {
            const r = await api("POST", `/rooms/${encodeURIComponent(room)}/members/${encodeURIComponent(m.user)}/remove`, {
              reason: "removed by an operator",
            });
            li.remove();
            return `Removed ${m.user} from ${room} (${r.removed} connection(s) here).`;
          }),
        );
        li.append(who, remove);
        return li;
      }),
    );
  } catch (e) {
    showError(e.message);
  }
}
$("members-more").addEventListener("click", () => loadMembers(membersNext));

async function loadMessages() {
  const room = currentRoom;
  try {
    // Messages in their current state (edits applied, deletes as tombstones).
    const h = await api("GET", `/rooms/${encodeURIComponent(room)}/messages?limit=50&current=true`);
    $("messages").replaceChildren(
      ...h.messages.map((m) => {
        const li = document.createElement("li");
        li.dataset.seq = String(m.seq);
        const edited = m.edited_ts ? " · edited" : "";
        const meta = cell("div", `#${m.seq} · ${m.from} · ${new Date(m.ts).toLocaleString()}${edited}`);
        meta.className = "meta";
        if (m.deleted) {
          const gone = cell("div", "(deleted)");
          gone.className = "muted";
          li.append(meta, gone);
          return li;
        }
        const del = cell("button", "Delete");
        del.type = "button";
        del.setAttribute("aria-label", `Delete message ${m.seq}`);
        del.addEventListener("click", () =>
          confirmed(`Delete message #${m.seq} from ${m.from} for everyone?\n\n${m.text}`, async () => {
            const r = await api("DELETE", `/rooms/${encodeURIComponent(room)}/messages/${m.seq}`);
            await loadMessages();
            return `Deleted message #${r.target} of ${room}.`;
          }),
        );
        li.append(meta, cell("div", m.text), del);
        return li;
      }),
    );
  } catch (e) {
    showError(e.message);
  }
}

$("post-form").addEventListener("submit", (ev) => {
  ev.preventDefault();
  const room = currentRoom;
  const text = $("post-text").value;
  if (!room || !text) return;
  confirmed(`Post this system message to ${room}?\n\n${text}`, async () => {
    const r = await api("POST", `/rooms/${encodeURIComponent(room)}/messages`, { text });
    $("post-text").value = "";
    await loadMessages();
    return `Posted to ${room} as seq ${r.seq}.`;
  });
});

// --- users ---

async function lookUp(user) {
  try {
    const u = await api("GET", `/users/${encodeURIComponent(user)}`);
    currentUser = u.user;
    $("user-view").hidden = false;
    $("user-name").textContent = u.user;
    $("user-state").textContent = u.online ? `online, ${u.connections} connection(s) on this node` : "offline";
    $("user-rooms").textContent = u.rooms.length ? `in ${u.rooms.join(", ")}` : "in no rooms";
  } catch (e) {
    showError(e.message);
  }
}

$("user-form").addEventListener("submit", (ev) => {
  ev.preventDefault();
  lookUp($("user-id").value.trim());
});
$("disconnect").addEventListener("click", () => {
  const user = currentUser;
  confirmed(`Disconnect every connection of ${user}?`, async () => {
    const r = await api("POST", `/users/${encodeURIComponent(user)}/disconnect`, {
      reason: $("ban-reason").value.trim() || "disconnected by an operator",
    });
    await lookUp(user);
    return `Disconnected ${user} (${r.closed} connection(s) here).`;
  });
});
$("ban-form").addEventListener("submit", (ev) => {
  ev.preventDefault();
  const user = currentUser;
  const hours = Number($("ban-hours").value);
  const body = { reason: $("ban-reason").value.trim() };
  if (hours > 0) body.until = Date.now() + hours * 3600 * 1000;
  confirmed(`Ban ${user}${hours > 0 ? ` for ${hours} h` : " until lifted"}?`, async () => {
    const r = await api("POST", `/users/${encodeURIComponent(user)}/ban`, body);
    await lookUp(user);
    return `Banned ${user} (${r.closed} connection(s) closed here).`;
  });
});
$("unban").addEventListener("click", () => {
  const user = currentUser;
  confirmed(`Lift the ban of ${user}?`, async () => {
    const r = await api("DELETE", `/users/${encodeURIComponent(user)}/ban`);
    return r.lifted ? `Lifted the ban of ${user}.` : `${user} was not banned.`;
  });
});

if (key) openConsole(key);
