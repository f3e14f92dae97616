// Chat state (protocol 1.1) on the chat page, in real headless Chromium against the
// real binary: edits, deletes and reactions between two pages and for a third that
// comes later; unread badges synced between devices; "Seen" in a DM.
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { Server, launch, userPage, joinRoom, send, messageTexts, waitForText, shot } from "./harness.mjs";

let browser;
before(async () => {
  browser = await launch();
});
after(async () => {
  await browser?.close();
});

/** The seq of the message bubble whose text is (or was) `text`, once it has one: a
 * message the page sent shows at once as "sending…", without a seq, until the
 * server's answer. */
async function seqOf(page, text) {
  const seq = await page.waitForFunction(
    (t) =>
      [...document.querySelectorAll("#message-list .msg")].find(
        (n) => n.dataset.seq && n.querySelector(".msg-text")?.textContent === t,
      )?.dataset.seq,
    text,
  );
  return seq.jsonValue();
}

async function reactWith(page, seq, emoji) {
  await page.click(`summary[aria-label="React to message ${seq}"]`);
  await page.click(`#message-list .msg[data-seq="${seq}"] button[aria-label="React ${emoji}"]`);
}

async function reactionOn(page, seq, label) {
  await page.waitForFunction(
    ([s, l]) =>
      [...document.querySelectorAll(`#message-list .msg[data-seq="${s}"] .reaction`)].some((b) => b.textContent === l),
    [seq, label],
    { timeout: 10000 },
  );
}

test("two pages edit, delete and react; a page opened later sees the current state", async () => {
  const server = await new Server().start();
  try {
    const alice = await userPage(browser, server, "alice");
    alice.on("dialog", (d) => d.accept());
    const bob = await userPage(browser, server, "bob");
    await joinRoom(alice, "lobby");
    await joinRoom(bob, "lobby");
    await send(alice, "helo wrold");
    await waitForText(bob, "helo wrold");
    const first = await seqOf(alice, "helo wrold");

    // Up arrow in the empty composer edits one's last message.
    await alice.focus("#composer-text");
    await alice.press("#composer-text", "ArrowUp");
    await alice.waitForSelector(".edit-box textarea");
    await alice.fill(".edit-box textarea", "hello world");
    await alice.press(".edit-box textarea", "Enter");
    await waitForText(bob, "hello world");
    await bob.waitForFunction(
      (s) => document.querySelector(`#message-list .msg[data-seq="${s}"] .msg-edited`) !== null,
      first,
    );

    await reactWith(bob, first, "👍");
    await reactionOn(alice, first, "👍 1");
    await reactWith(alice, first, "👍");
    await reactionOn(bob, first, "👍 2");

    await send(alice, "take this back");
    await waitForText(bob, "take this back");
    const second = await seqOf(alice, "take this back");
    await alice.click(`#message-list .msg[data-seq="${second}"] .msg-delete`);
    await bob.waitForFunction(
      (s) => document.querySelector(`#message-list .msg[data-seq="${s}"]`)?.classList.contains("deleted"),
      second,
      { timeout: 10000 },
    );
    assert.ok(!(await bob.content()).includes("take this back"), "the deleted text is gone from the other page");
    await shot(bob, "chat-state-01-edit-react-delete");

    // Someone who comes later sees the current state.
    const carol = await userPage(browser, server, "carol");
    await joinRoom(carol, "lobby");
    await waitForText(carol, "hello world");
    await reactionOn(carol, first, "👍 2");
    assert.deepEqual(await messageTexts(carol), ["hello world", "This message was deleted."]);
    assert.ok(!(await carol.content()).includes("take this back"));
  } finally {
    await server.stop();
  }
});

test("a room joined on the laptop is there on the phone, and reading on the phone clears the laptop's badge within a second", async () => {
  const server = await new Server().start();
  try {
    const laptop = await userPage(browser, server, "alice");
    await joinRoom(laptop, "team");
    await joinRoom(laptop, "other"); // the laptop looks at another room
    const bob = await userPage(browser, server, "bob");
    await joinRoom(bob, "team");
    await send(bob, "news for the team");
    await laptop.waitForSelector('#room-list button[data-key="r:team"] .badge', { timeout: 10000 });

    // The phone: a new browser, same user; its rooms come from the server.
    const phone = await userPage(browser, server, "alice", { width: 390, height: 844 });
    await phone.waitForSelector('#room-list button[data-key="r:team"]', { state: "attached", timeout: 10000 });
    await phone.waitForSelector('#room-list button[data-key="r:other"]', { state: "attached", timeout: 10000 });
    await phone.evaluate(() => document.querySelector('#room-list button[data-key="r:team"]').click());
    await waitForText(phone, "news for the team");
    const started = Date.now();
    await laptop.waitForSelector('#room-list button[data-key="r:team"] .badge', { state: "detached", timeout: 1000 });
    const took = Date.now() - started;
    assert.ok(took <= 1000, `the badge cleared in ${took} ms`);
  } finally {
    await server.stop();
  }
});

test("a DM shows Seen under the last message the other person has read", async () => {
  const server = await new Server().start();
  try {
    const alice = await userPage(browser, server, "alice");
    const bob = await userPage(browser, server, "bob");
    await joinRoom(alice, "lobby");
    await joinRoom(bob, "lobby");
    await alice.click('button[aria-label="Message bob"]');
    await send(alice, "are you there?");
    await waitForText(alice, "are you there?");
    assert.equal(await alice.$$eval(".msg-seen", (ns) => ns.length), 0, "not seen yet");
    await bob.waitForSelector('#dm-list button[data-key="d:alice"] .badge', { timeout: 10000 });
    await bob.click('#dm-list button[data-key="d:alice"]');
    await waitForText(bob, "are you there?");
    await alice.waitForFunction(
      () => document.querySelector("#message-list .msg.mine:last-of-type .msg-seen")?.textContent === "Seen",
      null,
      { timeout: 5000 },
    );
    await shot(alice, "chat-state-02-seen");
  } finally {
    await server.stop();
  }
});
