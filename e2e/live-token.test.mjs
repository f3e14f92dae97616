// Live tokens on the chat page, in real headless Chromium against the real binary:
// logged in with a token, the page asks for a new one when the server says it is
// expiring, and stays connected past the old token's expiry.
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { createHmac } from "node:crypto";
import { Server, launch, joinRoom, send, waitForText, waitForStatus, shot, sleep } from "./harness.mjs";

const SECRET = "a-browser-test-secret-of-32-bytes!!";

/** An HS256 JWT, signed here (no library needed). */
function jwt(claims) {
  const b64 = (o) => Buffer.from(JSON.stringify(o)).toString("base64url");
  const head = `${b64({ alg: "HS256", typ: "JWT" })}.${b64(claims)}`;
  return `${head}.${createHmac("sha256", SECRET).update(head).digest("base64url")}`;
}
const now = () => Math.floor(Date.now() / 1000);

let browser;
before(async () => {
  browser = await launch();
});
after(async () => {
  await browser?.close();
});

test("logged in with a token, the page asks for a new one when it is expiring and stays connected", async () => {
  const server = await new Server(["--jwt-secret", SECRET, "--token-expiring-notice", "2"]).start();
  try {
    const context = await browser.newContext({ viewport: { width: 1280, height: 800 } });
    const page = await context.newPage();
    page.on("pageerror", (e) => console.error("[alice] page error:", e));
    await page.goto(server.http + "/");
    await page.click("summary");
    const exp = now() + 4;
    await page.fill("#login-token", jwt({ sub: "alice", exp }));
    await page.click("#login-submit");
    await waitForStatus(page, "Connected");
    await joinRoom(page, "lobby");
    await page.waitForSelector("#token-form:not([hidden])", { timeout: 10000 });
    await shot(page, "token-01-asks-for-a-new-one");
    await page.fill("#token-new", jwt({ sub: "alice", exp: now() + 600 }));
    await page.click("#token-submit");
    await page.waitForSelector("#token-form", { state: "hidden", timeout: 5000 });
    // Past the old token's expiry (and the server's leeway): still connected.
    while (now() <= exp + 2) await sleep(250);
    const status = await page.$eval("#status", (n) => n.textContent);
    assert.equal(status, "Connected");
    await send(page, "still here after the old token expired");
    await waitForText(page, "still here after the old token expired");
  } finally {
    await server.stop();
  }
});

test("a new token for another user is refused and the page says so", async () => {
  const server = await new Server(["--jwt-secret", SECRET, "--token-expiring-notice", "30"]).start();
  try {
    const context = await browser.newContext();
    const page = await context.newPage();
    await page.goto(server.http + "/");
    await page.click("summary");
    await page.fill("#login-token", jwt({ sub: "alice", exp: now() + 20 }));
    await page.click("#login-submit");
    await waitForStatus(page, "Connected");
    await page.waitForSelector("#token-form:not([hidden])", { timeout: 10000 });
    await page.fill("#token-new", jwt({ sub: "mallory", exp: now() + 600 }));
    await page.click("#token-submit");
    await page.waitForFunction(() => document.getElementById("token-error").textContent.length > 0);
    assert.equal(await page.isVisible("#token-form"), true, "still asking");
    await page.fill("#token-new", jwt({ sub: "alice", exp: now() + 600 }));
    await page.click("#token-submit");
    await page.waitForSelector("#token-form", { state: "hidden", timeout: 5000 });
  } finally {
    await server.stop();
  }
});

test("the SDK back with a token that expired while it was away asks getToken for a new one and connects with it", async () => {
  const server = await new Server(["--jwt-secret", SECRET]).start();
  try {
    const context = await browser.newContext();
    const page = await context.newPage();
    page.on("pageerror", (e) => console.error("[sdk] page error:", e));
    await page.goto(server.http + "/");
    const stale = jwt({ sub: "alice", exp: now() - 60 });
    const fresh = jwt({ sub: "alice", exp: now() + 600 });
    const got = await page.evaluate(
      async ({ url, stale, fresh }) => {
        const { Hubbub } = await import("/hubbub.js");
        let asked = 0;
        const hub = new Hubbub({
          url,
          token: stale,
          getToken: async () => {
            asked += 1;
            return fresh;
          },
        });
        const closes = [];
        hub.on("state", (ev) => {
          if (ev.code) closes.push(`${ev.code} ${ev.reason}`);
        });
        const welcome = await hub.connect();
        const seen = [...closes];
        hub.close();
        return { type: welcome.type, user: welcome.user, asked, closes: seen };
      },
      { url: server.ws, stale, fresh },
    );
    assert.equal(got.type, "welcome");
    assert.equal(got.user, "alice");
    assert.equal(got.asked, 1, "one new token asked for");
    assert.deepEqual(got.closes, ["4001 token expired"], "the close said why");
  } finally {
    await server.stop();
  }
});
