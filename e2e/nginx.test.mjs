// The chat page through Debian's nginx with deploy/nginx/hubbub.conf (rendered with
// test ports): plain HTTP and TLS terminated at nginx, and a reconnect when the
// Hubbub node behind nginx restarts.
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { spawn, execFileSync } from "node:child_process";
import { mkdtempSync, mkdirSync, readFileSync, writeFileSync, existsSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { Server, launch, freePort, login, joinRoom, send, waitForText, waitForStatus, messageTexts, shot, ROOT, sleep } from "./harness.mjs";

const NGINX = process.env.NGINX || "/usr/sbin/nginx";

/** Render the repo's nginx config for these ports inside a minimal main config. */
function renderNginx(dir, httpPort, httpsPort, upstreamPort) {
  execFileSync("openssl", [
    "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
    "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", join(dir, "key.pem"), "-out", join(dir, "cert.pem"),
  ], { stdio: "ignore" });
  let site = readFileSync(join(ROOT, "deploy/nginx/hubbub.conf"), "utf8");
  site = site
    .replace(/    server 127\.0\.0\.1:8081[^\n]*\n    server 127\.0\.0\.1:8082[^\n]*\n/, `    server 127.0.0.1:${upstreamPort} max_fails=0;\n`)
    .replace("listen 80;", `listen 127.0.0.1:${httpPort};`)
    .replace("listen 443 ssl;", `listen 127.0.0.1:${httpsPort} ssl;`)
    .replace("/etc/ssl/hubbub/fullchain.pem", join(dir, "cert.pem"))
    .replace("/etc/ssl/hubbub/privkey.pem", join(dir, "key.pem"));
  assert.ok(site.includes(`127.0.0.1:${upstreamPort}`), "upstream rendered");
  writeFileSync(join(dir, "hubbub.conf"), site);
  for (const t of ["body", "proxy", "fcgi", "uwsgi", "scgi"]) mkdirSync(join(dir, `tmp-${t}`), { recursive: true, mode: 0o777 });
  writeFileSync(
    join(dir, "nginx.conf"),
    `worker_processes 1;\nerror_log ${dir}/error.log;\npid ${dir}/nginx.pid;\n` +
      `events { worker_connections 1024; }\n` +
      `http {\n access_log ${dir}/access.log;\n client_body_temp_path ${dir}/tmp-body;\n proxy_temp_path ${dir}/tmp-proxy;\n` +
      ` fastcgi_temp_path ${dir}/tmp-fcgi;\n uwsgi_temp_path ${dir}/tmp-uwsgi;\n scgi_temp_path ${dir}/tmp-scgi;\n include ${dir}/hubbub.conf;\n}\n`,
  );
  return join(dir, "nginx.conf");
}

async function startNginx(dir, conf) {
  const proc = spawn(NGINX, ["-p", dir, "-c", conf, "-g", "daemon off;"], { stdio: ["ignore", "ignore", "pipe"] });
  let err = "";
  proc.stderr.on("data", (d) => (err += d));
  await sleep(500);
  if (proc.exitCode !== null) throw new Error(`nginx exited: ${err}`);
  return proc;
}

let browser, nginx, hubbub, httpPort, httpsPort;
before(async () => {
  assert.ok(existsSync(NGINX), "nginx is needed (scripts/test installs Debian's nginx)");
  browser = await launch();
  hubbub = await new Server(["--trusted-proxies", "127.0.0.1", "--log-format", "json"]).start();
  const dir = mkdtempSync(join(tmpdir(), "hubbub-nginx-"));
  httpPort = await freePort();
  httpsPort = await freePort();
  nginx = await startNginx(dir, renderNginx(dir, httpPort, httpsPort, hubbub.port));
});
after(async () => {
  nginx?.kill("SIGTERM");
  await hubbub?.stop();
  await browser?.close();
});

const viaNginx = (proto, port) => ({ http: `${proto}://127.0.0.1:${port}` });

test("two browsers chat through nginx, and the page reconnects when the node behind it restarts", async () => {
  const front = viaNginx("http", httpPort);
  const ctxA = await browser.newContext();
  const ctxB = await browser.newContext();
  const alice = await ctxA.newPage();
  const bob = await ctxB.newPage();
  await login(alice, front, "alice");
  await login(bob, front, "bob");
  await joinRoom(alice, "proxied");
  await joinRoom(bob, "proxied");
  await send(alice, "through nginx");
  await waitForText(bob, "through nginx");
  // Restart the node behind nginx.
  assert.equal(await hubbub.stop(), 0);
  await alice.waitForFunction(() => document.getElementById("status").textContent.startsWith("Reconnecting"));
  await hubbub.start();
  await waitForStatus(alice, "Connected", 40000);
  await waitForStatus(bob, "Connected", 40000);
  await send(bob, "after the restart");
  await waitForText(alice, "after the restart");
  assert.deepEqual(await messageTexts(alice), ["through nginx", "after the restart"]);
  await shot(alice, "08-through-nginx");
  await ctxA.close();
  await ctxB.close();
});

test("TLS terminated at nginx: the page and its WebSocket work over https and wss", async () => {
  const ctx = await browser.newContext({ ignoreHTTPSErrors: true });
  const page = await ctx.newPage();
  await login(page, viaNginx("https", httpsPort), "carol");
  assert.ok(page.url().startsWith("https://"));
  await joinRoom(page, "secure");
  await send(page, "over wss");
  await waitForText(page, "over wss");
  await ctx.close();
});
