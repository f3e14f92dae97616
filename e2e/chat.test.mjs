// The chat page in real headless Chromium against the real hubbub binary.
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import {
  Server,
  launch,
  userPage,
  joinRoom,
  send,
  messageTexts,
  waitForText,
  waitForStatus,
  shot,
  nodeClient,
  sleep,
} from "./harness.mjs";

let browser;
before(async () => {
  browser = await launch();
});
after(async () => {
  await browser?.close();
});

test("two users in a room see each other's messages, in the same order", async () => {
  const server = await new Server().start();
  try {
    const alice = await userPage(browser, server, "alice");
    await shot(alice, "01-joined-empty-room");
    const bob = await userPage(browser, server, "bob");
    await joinRoom(alice, "lobby");
    await joinRoom(bob, "lobby");
    await send(alice, "hi bob");
    await waitForText(bob, "hi bob");
    await send(bob, "hello alice");
    await send(alice, "how are you?");
    for (const page of [alice, bob]) await waitForText(page, "how are you?");
    const a = await messageTexts(alice);
    const b = await messageTexts(bob);
    assert.deepEqual(a, ["hi bob", "hello alice", "how are you?"]);
    assert.deepEqual(b, a);
    // Own messages are marked.
    const mine = await alice.$$eval("#message-list .msg.mine .msg-text", (ns) => ns.map((n) => n.textContent));
    assert.deepEqual(mine, ["hi bob", "how are you?"]);
    await shot(alice, "02-chat-desktop");
  } finally {
    await server.stop();
  }
});

test("a direct message reaches only its recipient and the sender's other tab", async () => {
  const server = await new Server().start();
  try {
    const alice = await userPage(browser, server, "alice");
    const aliceTab2 = await alice.context().newPage();
    await aliceTab2.goto(server.http + "/");
    await aliceTab2.fill("#login-name", "alice");
    await aliceTab2.click("#login-submit");
    await waitForStatus(aliceTab2, "Connected");
    const bob = await userPage(browser, server, "bob");
    const carol = await userPage(browser, server, "carol");
    for (const p of [alice, aliceTab2, bob, carol]) await joinRoom(p, "lobby");
    // Alice opens a DM with bob from the member list.
    await alice.click('button[aria-label="Message bob"]');
    await alice.waitForFunction(() => document.getElementById("chat-title").textContent === "@ bob");
    await send(alice, "just for you");
    await waitForText(alice, "just for you");
    // Bob sees an unread DM from alice, opens it, and reads it.
    await bob.waitForSelector('#dm-list button[data-key="d:alice"] .badge');
    await bob.click('#dm-list button[data-key="d:alice"]');
    await waitForText(bob, "just for you");
    // Alice's other tab has it too.
    await aliceTab2.waitForSelector('#dm-list button[data-key="d:bob"]');
    await aliceTab2.click('#dm-list button[data-key="d:bob"]');
    await waitForText(aliceTab2, "just for you");
    // Carol has no DM at all.
    await sleep(500);
    assert.equal(await carol.$$eval("#dm-list li", (ns) => ns.length), 0);
    assert.ok(!(await carol.content()).includes("just for you"));
    await shot(bob, "03-direct-message");
  } finally {
    await server.stop();
  }
});

test("presence and typing show up in the other window", async () => {
  const server = await new Server().start();
  try {
    const alice = await userPage(browser, server, "alice");
    await joinRoom(alice, "lobby");
    const bob = await userPage(browser, server, "bob");
    await joinRoom(bob, "lobby");
    await alice.waitForFunction(() =>
      [...document.querySelectorAll("#member-list .member-name")].some((n) => n.textContent === "bob"),
    );
    await bob.type("#composer-text", "typing something");
    await alice.waitForFunction(() => document.getElementById("typing").textContent === "bob is typing…", null, {
      timeout: 5000,
    });
    await shot(alice, "04-presence-and-typing");
    await bob.context().close();
    await alice.waitForFunction(
      () => ![...document.querySelectorAll("#member-list .member-name")].some((n) => n.textContent === "bob"),
      null,
      { timeout: 10000 },
    );
  } finally {
    await server.stop();
  }
});

test("after a server restart the page reconnects by itself and shows missed messages exactly once", async () => {
  const server = await new Server().start();
  try {
    const alice = await userPage(browser, server, "alice");
    await joinRoom(alice, "lobby");
    await send(alice, "before restart");
    await waitForText(alice, "before restart");
    assert.equal(await server.stop(), 0, "hubbub exits 0 after SIGTERM");
    // Read the status in the same instant it shows "Reconnecting" (the next attempt
    // may start within a second and show "Connecting…").
    const seen = await alice.waitForFunction(() => {
      const t = document.getElementById("status").textContent;
      return t.startsWith("Reconnecting") ? t : false;
    });
    const statusText = await seen.jsonValue();
    assert.match(statusText, /^Reconnecting( in \d+ s)?…$/);
    await shot(alice, "05-reconnecting");
    // Stay down long enough for the page's backoff to grow past a second or two.
    await sleep(3000);
    await server.start();
    // Another client sends while the page is still waiting to reconnect.
    const bob = await nodeClient(server, "bob");
    await bob.join("lobby");
    for (const t of ["missed 1", "missed 2", "missed 3"]) await bob.send("lobby", t);
    await waitForStatus(alice, "Connected", 40000);
    await waitForText(alice, "missed 3");
    await sleep(500);
    assert.deepEqual(await messageTexts(alice), ["before restart", "missed 1", "missed 2", "missed 3"]);
    await send(alice, "after restart");
    await waitForText(alice, "after restart");
    bob.close();
  } finally {
    await server.stop();
  }
});

test("a message typed while the server is down is sent once after reconnecting", async () => {
  const server = await new Server().start();
  try {
    const alice = await userPage(browser, server, "alice");
    await joinRoom(alice, "lobby");
    await server.stop();
    await alice.waitForFunction(() => document.getElementById("status").textContent.startsWith("Reconnecting"));
    await send(alice, "written offline");
    await alice.waitForSelector("#message-list .msg.pending");
    await server.start();
    await waitForStatus(alice, "Connected", 40000);
    await waitForText(alice, "written offline");
    await alice.waitForFunction(() => document.querySelectorAll("#message-list .msg.pending").length === 0);
    const check = await nodeClient(server, "checker");
    const h = await check.history({ room: "lobby" });
    assert.deepEqual(
      h.messages.map((m) => m.text),
      ["written offline"],
      "stored exactly once",
    );
    check.close();
  } finally {
    await server.stop();
  }
});

test("HTML in a message is shown as text, not markup", async () => {
  const server = await new Server().start();
  try {
    const alice = await userPage(browser, server, "alice");
    const bob = await userPage(browser, server, "bob");
    await joinRoom(alice, "lobby");
    await joinRoom(bob, "lobby");
    const evil = `<img src=x onerror="window.__pwned=1"><b>bold</b><script>window.__pwned=2</script>`;
    await send(alice, evil);
    await waitForText(bob, evil);
    assert.equal(await bob.evaluate(() => window.__pwned), undefined);
    assert.equal(await bob.$$eval("#message-list img, #message-list b, #message-list script", (n) => n.length), 0);
  } finally {
    await server.stop();
  }
});

test("server errors appear as readable text next to the message that caused them", async () => {
  const server = await new Server(["--max-text", "10"]).start();
  try {
    const alice = await userPage(browser, server, "alice");
    await joinRoom(alice, "lobby");
    await send(alice, "this text is far too long");
    await alice.waitForSelector("#message-list .msg.failed .msg-error");
    const err = await alice.textContent("#message-list .msg.failed .msg-error");
    assert.match(err, /too long/);
    assert.match(await alice.textContent("#composer-error"), /too long/);
    await alice.fill("#join-room", "no spaces allowed");
    await alice.press("#join-room", "Enter");
    assert.match(await alice.textContent("#join-error"), /Room names/);
    await shot(alice, "06-error-shown");
  } finally {
    await server.stop();
  }
});

test("the page works at phone width", async () => {
  const server = await new Server().start();
  try {
    const page = await userPage(browser, server, "mobile", { width: 390, height: 780 });
    await page.click("#menu-toggle");
    await joinRoom(page, "lobby");
    await send(page, "from my phone");
    await waitForText(page, "from my phone");
    const overflow = await page.evaluate(() => document.documentElement.scrollWidth > window.innerWidth);
    assert.equal(overflow, false, "no horizontal scrolling");
    await shot(page, "07-phone");
  } finally {
    await server.stop();
  }
});

test("the whole flow works from the keyboard alone", async () => {
  const server = await new Server().start();
  try {
    const context = await browser.newContext({ viewport: { width: 1280, height: 800 } });
    const page = await context.newPage();
    await page.goto(server.http + "/");
    // The name field has focus on load.
    await page.keyboard.type("keys");
    await page.keyboard.press("Enter");
    await waitForStatus(page, "Connected");
    // Focus lands on the room field; the composer takes focus after joining.
    await page.keyboard.type("kb-room");
    await page.keyboard.press("Enter");
    await page.waitForFunction(() => document.getElementById("chat-title").textContent === "# kb-room");
    await page.keyboard.type("typed with keys");
    await page.keyboard.press("Enter");
    await waitForText(page, "typed with keys");
  } finally {
    await server.stop();
  }
});

test("scrolling to the top loads older history, in order, without duplicates", async () => {
  const server = await new Server(["--rate-limit", "1000"]).start();
  try {
    const bob = await nodeClient(server, "bob");
    await bob.join("long");
    for (let i = 1; i <= 120; i++) await bob.send("long", `line ${i}`);
    const alice = await userPage(browser, server, "alice");
    await joinRoom(alice, "long");
    await waitForText(alice, "line 120");
    assert.equal((await messageTexts(alice)).length, 50, "join shows the latest 50");
    for (let i = 0; i < 10 && (await messageTexts(alice)).length < 120; i++) {
      await alice.evaluate(() => {
        const box = document.getElementById("messages");
        box.scrollTop = 0;
        box.dispatchEvent(new Event("scroll"));
      });
      await sleep(300);
    }
    const texts = await messageTexts(alice);
    assert.deepEqual(
      texts,
      Array.from({ length: 120 }, (_, i) => `line ${i + 1}`),
    );
    assert.equal(await alice.isHidden("#load-older"), true, "nothing older left to load");
    bob.close();
  } finally {
    await server.stop();
  }
});

test("a large room shows the member count and pages its member list", async () => {
  // Over 2 members the server sends counts instead of who joined (PROTOCOL 1.1).
  const server = await new Server(["--presence-events-max", "2"]).start();
  const others = [];
  try {
    const alice = await userPage(browser, server, "alice");
    await joinRoom(alice, "big");
    for (const name of ["bob", "carol", "dave", "erin"]) {
      const c = await nodeClient(server, name);
      await c.join("big");
      others.push(c);
    }
    await alice.waitForFunction(() => document.getElementById("member-count").textContent === "(5)", null, {
      timeout: 5000,
    });
    const names = () =>
      alice.evaluate(() => [...document.querySelectorAll("#member-list .member-name")].map((n) => n.textContent));
    // The list reloads its first page when the count says it is stale.
    await alice.waitForFunction(() => document.querySelectorAll("#member-list .member-name").length === 5, null, {
      timeout: 5000,
    });
    assert.deepEqual(await names(), ["alice", "bob", "carol", "dave", "erin"]);
    assert.equal(await alice.evaluate(() => document.getElementById("members-more").hidden), true);
    await shot(alice, "13-large-room-count");
  } finally {
    for (const c of others) c.close();
    await server.stop();
  }
});

test("joining a room of over 100 members lists the first 100 and pages the rest", async () => {
  const server = await new Server().start();
  const others = [];
  try {
    for (let i = 0; i < 101; i++) {
      const c = await nodeClient(server, `a${String(i).padStart(3, "0")}`);
      await c.join("crowd");
      others.push(c);
    }
    const alice = await userPage(browser, server, "alice");
    await joinRoom(alice, "crowd");
    const listed = () => alice.evaluate(() => document.querySelectorAll("#member-list .member-name").length);
    await alice.waitForFunction(() => document.getElementById("member-count").textContent === "(102)");
    assert.equal(await listed(), 100, "the joined reply's first page");
    assert.equal(await alice.evaluate(() => document.getElementById("members-more").hidden), false);
    await alice.click("#members-more");
    await alice.waitForFunction(() => document.querySelectorAll("#member-list .member-name").length === 102);
    assert.equal(await alice.evaluate(() => document.getElementById("members-more").hidden), true);
  } finally {
    for (const c of others) c.close();
    await server.stop();
  }
});

test("a page on another origin imports the SDK from the server and chats", async () => {
  const { createServer } = await import("node:http");
  const server = await new Server().start();
  // A page of another origin (another port) that imports /hubbub.js cross-origin.
  const page = `<!doctype html><meta charset="utf-8"><script type="module">
    import { Hubbub } from "${server.http}/hubbub.js";
    const hub = new Hubbub({ url: "${server.ws}", name: "elsewhere" });
    await hub.connect();
    await hub.join("lobby");
    const ack = await hub.send("lobby", "hello from another origin");
    window.result = ack.seq;
  </script>`;
  const other = createServer((req, res) => {
    res.writeHead(200, { "Content-Type": "text/html" });
    res.end(page);
  });
  await new Promise((r) => other.listen(0, "127.0.0.1", r));
  try {
    const context = await browser.newContext();
    const p = await context.newPage();
    const errors = [];
    p.on("pageerror", (e) => errors.push(String(e)));
    p.on("console", (m) => m.type() === "error" && errors.push(m.text()));
    await p.goto(`http://127.0.0.1:${other.address().port}/`);
    await p.waitForFunction(() => typeof window.result === "number", null, { timeout: 10000 }).catch(() => {
      throw new Error(`the cross-origin page did not chat: ${errors.join("; ")}`);
    });
    assert.equal(await p.evaluate(() => window.result), 1);
    await context.close();
  } finally {
    other.close();
    await server.stop();
  }
});

test("the pages run under their Content-Security-Policy and another origin cannot frame them", async () => {
  const { createServer } = await import("node:http");
  const server = await new Server().start();
  const other = createServer((req, res) => {
    res.writeHead(200, { "Content-Type": "text/html" });
    res.end(`<!doctype html><iframe id="f" src="${server.http}/"></iframe>`);
  });
  await new Promise((r) => other.listen(0, "127.0.0.1", r));
  try {
    const context = await browser.newContext();
    const p = await context.newPage();
    const violations = [];
    p.on("console", (m) => /Content Security Policy|Refused to/.test(m.text()) && violations.push(m.text()));
    const res = await p.goto(server.http + "/");
    assert.match(res.headers()["content-security-policy"], /frame-ancestors 'none'/);
    await p.fill("#login-name", "csp");
    await p.click("#login-submit");
    await waitForStatus(p, "Connected");
    await joinRoom(p, "lobby");
    await send(p, "under the policy");
    await waitForText(p, "under the policy");
    const admin = await context.newPage();
    admin.on("console", (m) => /Content Security Policy|Refused to/.test(m.text()) && violations.push(m.text()));
    await admin.goto(server.http + "/admin");
    await admin.waitForSelector("#key-form");
    assert.deepEqual(violations, [], "the pages break none of their own policy");

    const framer = await context.newPage();
    const blocked = [];
    framer.on("console", (m) => /frame-ancestors|Refused to frame/.test(m.text()) && blocked.push(m.text()));
    await framer.goto(`http://127.0.0.1:${other.address().port}/`);
    await framer.waitForTimeout(1500);
    const framedLogin = await framer
      .frames()
      .find((f) => f.url().startsWith(server.http))
      ?.$("#login-name")
      .catch(() => null);
    assert.ok(!framedLogin, "the chat page did not render inside another origin's frame");
    assert.ok(blocked.length > 0, "Chromium reports the refused framing");
    await context.close();
  } finally {
    other.close();
    await server.stop();
  }
});
