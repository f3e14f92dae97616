// The admin console (/admin) in real headless Chromium, against the real binary,
// with a real chat page open beside it.
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { Server, launch, userPage, joinRoom, send, waitForText, waitForStatus, shot, sleep } from "./harness.mjs";

const KEY = "admin-test-key-0123456789";
let browser;
before(async () => {
  browser = await launch();
});
after(async () => {
  await browser?.close();
});

async function consolePage(server, viewport = { width: 1280, height: 900 }) {
  const context = await browser.newContext({ viewport });
  const page = await context.newPage();
  page.on("pageerror", (e) => console.error("[admin] page error:", e));
  // Every action asks first; the operator says yes.
  page.on("dialog", (d) => d.accept());
  await page.goto(server.http + "/admin");
  return page;
}

async function logIn(page, key = KEY) {
  await page.fill("#api-key", key);
  await page.press("#api-key", "Enter");
}

async function figure(page, key) {
  return page.$eval(`.figure[data-key="${key}"] .v`, (n) => n.textContent);
}

test("the console needs a key, refuses a wrong one, and keeps a right one for the tab", async () => {
  const server = await new Server(["--api-key", KEY]).start();
  try {
    const page = await consolePage(server);
    assert.equal(await page.isVisible("#key-form"), true);
    assert.equal(await page.isVisible("#console"), false);
    await logIn(page, "wrong-key-0123456789");
    await page.waitForFunction(() => document.getElementById("key-error").textContent.includes("not accepted"));
    assert.equal(await page.isVisible("#console"), false);
    await logIn(page);
    await page.waitForSelector("#console:not([hidden])");
    await page.reload();
    await page.waitForSelector("#console:not([hidden])", { timeout: 5000 });
    await page.click("#logout");
    await page.waitForSelector("#key-form", { state: "visible" });
  } finally {
    await server.stop();
  }
});

test("live figures change while a client chats; a room shows its members and messages; a system message reaches the chat", async () => {
  const server = await new Server(["--api-key", KEY]).start();
  try {
    const page = await consolePage(server);
    await logIn(page);
    await page.waitForSelector(".figure");
    assert.equal(await figure(page, "connections"), "0");

    const alice = await userPage(browser, server, "alice");
    await joinRoom(alice, "lobby");
    await page.waitForFunction(
      () => document.querySelector('.figure[data-key="connections"] .v')?.textContent === "1",
      null,
      { timeout: 10000 },
    );
    for (let i = 0; i < 8; i++) {
      await send(alice, `chat ${i}`);
      await sleep(150);
    }
    await page.waitForFunction(
      () => Number(document.querySelector('.figure[data-key="messages_per_sec"] .v')?.textContent) > 0,
      null,
      { timeout: 10000 },
    );
    await shot(page, "admin-01-overview");

    await page.click("#rooms-first");
    await page.click('button[aria-label="Open room lobby"]');
    await page.waitForFunction(() => document.getElementById("members").textContent.includes("alice"));
    await page.waitForFunction(() => document.getElementById("messages").textContent.includes("chat 7"));

    await page.fill("#post-text", "Maintenance at 18:00 <b>not bold</b>");
    await page.press("#post-text", "Enter");
    await waitForText(alice, "Maintenance at 18:00 <b>not bold</b>");
    await page.waitForFunction(() => document.getElementById("action-ok").textContent.startsWith("Posted to lobby"));
    // User text is text: no element was made from it.
    assert.equal(await page.$$eval("#messages b", (n) => n.length), 0);
    await shot(page, "admin-02-room");
  } finally {
    await server.stop();
  }
});

test("deleting a message in the console takes it off a chat page open beside it", async () => {
  const server = await new Server(["--api-key", KEY]).start();
  try {
    const alice = await userPage(browser, server, "alice");
    await joinRoom(alice, "lobby");
    await send(alice, "an unfortunate remark");
    await waitForText(alice, "an unfortunate remark");
    const page = await consolePage(server);
    await logIn(page);
    await page.click("#rooms-first");
    await page.click('button[aria-label="Open room lobby"]');
    await page.waitForFunction(() => document.getElementById("messages").textContent.includes("an unfortunate remark"));
    await page.click('button[aria-label="Delete message 1"]');
    await page.waitForFunction(() => document.getElementById("action-ok").textContent.startsWith("Deleted message #1"));
    await alice.waitForFunction(
      () => document.querySelector('#message-list .msg[data-seq="1"]')?.textContent.includes("This message was deleted."),
      null,
      { timeout: 5000 },
    );
    assert.ok(!(await alice.content()).includes("an unfortunate remark"), "the text is gone from the chat page");
    await page.waitForFunction(() => !document.getElementById("messages").textContent.includes("an unfortunate remark"));
    await shot(page, "admin-04-deleted");
  } finally {
    await server.stop();
  }
});

test("a banned user's page says why and does not reconnect; an error from the API is shown", async () => {
  const server = await new Server(["--api-key", KEY]).start();
  try {
    const page = await consolePage(server);
    await logIn(page);
    const alice = await userPage(browser, server, "alice");
    await page.fill("#user-id", "alice");
    await page.press("#user-id", "Enter");
    await page.waitForFunction(() => document.getElementById("user-state").textContent.startsWith("online"));
    await page.fill("#ban-reason", "spam");
    await page.click("#ban");
    await page.waitForFunction(() => document.getElementById("action-ok").textContent.startsWith("Banned alice"));
    await waitForStatus(alice, "Signed out: banned");
    await sleep(2500);
    const status = await alice.$eval("#status", (n) => n.textContent);
    assert.ok(status.startsWith("Signed out: banned"), `still signed out, not reconnecting: ${status}`);

    // An API error reaches the operator: a user id with a control character.
    await page.fill("#user-id", "bad\u0001id");
    await page.press("#user-id", "Enter");
    await page.waitForFunction(() => document.getElementById("action-error").textContent.startsWith("bad_request"));

    await page.fill("#user-id", "alice");
    await page.press("#user-id", "Enter");
    await page.waitForFunction(() => document.getElementById("user-state").textContent === "offline");
    await page.click("#unban");
    await page.waitForFunction(() => document.getElementById("action-ok").textContent.startsWith("Lifted the ban"));
  } finally {
    await server.stop();
  }
});

test("the console works at phone width", async () => {
  const server = await new Server(["--api-key", KEY]).start();
  try {
    const page = await consolePage(server, { width: 390, height: 844 });
    await logIn(page);
    await page.waitForSelector(".figure");
    const overflow = await page.evaluate(() => document.documentElement.scrollWidth - window.innerWidth);
    assert.ok(overflow <= 1, `no horizontal scrolling at 390 px (overflow ${overflow})`);
    await shot(page, "admin-03-phone");
  } finally {
    await server.stop();
  }
});
