// Test harness for the browser tests: the real hubbub binary on a loopback port,
// Debian's Chromium driven by playwright-core, and the SDK in Node as "another client".
import { spawn } from "node:child_process";
import { createServer } from "node:net";
import { mkdtempSync, mkdirSync } from "node:fs";
import { tmpdir } from "node:os";
import { join, dirname } from "node:path";
import { fileURLToPath } from "node:url";
import { chromium } from "playwright-core";
import { Hubbub } from "../web/hubbub.js";

const here = dirname(fileURLToPath(import.meta.url));
export const ROOT = join(here, "..");
export const SCREENSHOTS = join(here, "screenshots");
const BIN = process.env.HUBBUB_BIN || join(ROOT, "target", "debug", "hubbub");
const CHROMIUM = process.env.CHROMIUM || "/usr/bin/chromium";

export async function freePort() {
  return new Promise((resolve, reject) => {
    const s = createServer();
    s.on("error", reject);
    s.listen(0, "127.0.0.1", () => {
      const { port } = s.address();
      s.close(() => resolve(port));
    });
  });
}

/** A hubbub process on a fixed port, so that a restart comes back at the same URL. */
export class Server {
  constructor(args = []) {
    this.args = args;
    this.dir = mkdtempSync(join(tmpdir(), "hubbub-e2e-"));
    this.proc = null;
  }

  async start() {
    if (!this.port) this.port = await freePort();
    const proc = spawn(BIN, ["--listen", `127.0.0.1:${this.port}`, "--data-dir", join(this.dir, "data"), ...this.args], {
      stdio: ["ignore", "pipe", "pipe"],
    });
    this.proc = proc;
    let log = "";
    proc.stderr.on("data", (d) => (log += d));
    await new Promise((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error(`hubbub did not start:\n${log}`)), 15000);
      let out = "";
      proc.stdout.on("data", (d) => {
        out += d;
        if (out.includes("hubbub listening on")) {
          clearTimeout(timer);
          resolve();
        }
      });
      proc.on("exit", (code) => {
        clearTimeout(timer);
        reject(new Error(`hubbub exited with ${code}:\n${log}`));
      });
    });
    proc.removeAllListeners("exit");
    return this;
  }

  get http() {
    return `http://127.0.0.1:${this.port}`;
  }

  get ws() {
    return `ws://127.0.0.1:${this.port}/ws`;
  }

  /** SIGTERM and wait for the exit code. */
  async stop() {
    const proc = this.proc;
    if (!proc || proc.exitCode !== null) return proc?.exitCode;
    this.proc = null;
    return new Promise((resolve) => {
      proc.on("exit", (code) => resolve(code));
      proc.kill("SIGTERM");
    });
  }
}

export async function launch() {
  mkdirSync(SCREENSHOTS, { recursive: true });
  return chromium.launch({
    executablePath: CHROMIUM,
    headless: true,
    args: [
      "--no-sandbox",
      "--disable-gpu",
      "--disable-quic",
      "--no-first-run",
      "--disable-background-networking",
      "--disable-component-update",
      "--disable-sync",
    ],
  });
}

/** A fresh browser context (its own storage) with one page, logged in as `name`. */
export async function userPage(browser, server, name, viewport = { width: 1280, height: 800 }) {
  const context = await browser.newContext({ viewport });
  const page = await context.newPage();
  page.on("pageerror", (e) => console.error(`[${name}] page error:`, e));
  await login(page, server, name);
  return page;
}

export async function login(page, server, name) {
  await page.goto(server.http + "/");
  await page.fill("#login-name", name);
  await page.click("#login-submit");
  await page.waitForSelector("#app:not([hidden])", { timeout: 10000 });
  await waitForStatus(page, "Connected");
}

export async function waitForStatus(page, text, timeout = 15000) {
  await page.waitForFunction((t) => document.getElementById("status").textContent.startsWith(t), text, {
    timeout,
  });
}

export async function joinRoom(page, room) {
  await page.fill("#join-room", room);
  await page.press("#join-room", "Enter");
  await page.waitForFunction((r) => document.getElementById("chat-title").textContent === `# ${r}`, room, {
    timeout: 10000,
  });
}

export async function send(page, text) {
  await page.fill("#composer-text", text);
  await page.press("#composer-text", "Enter");
}

/** Texts of the delivered (not pending) messages in view, in page order. */
export async function messageTexts(page) {
  return page.$$eval("#message-list .msg:not(.pending):not(.failed) .msg-text", (ns) => ns.map((n) => n.textContent));
}

export async function waitForText(page, text, timeout = 15000) {
  await page.waitForFunction(
    (t) => [...document.querySelectorAll("#message-list .msg:not(.pending) .msg-text")].some((n) => n.textContent === t),
    text,
    { timeout },
  );
}

export async function shot(page, name) {
  await page.screenshot({ path: join(SCREENSHOTS, `${name}.png`) });
}

/** The SDK in Node, connected to the real server: another client. */
export async function nodeClient(server, name) {
  const hub = new Hubbub({ url: server.ws, name, WebSocket: globalThis.WebSocket, reconnect: false });
  await hub.connect();
  return hub;
}

export const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
