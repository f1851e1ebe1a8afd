// Test harness: a private local stack (chat-local) on real PostgreSQL and
// Redis. Each Stack has its own database, Redis key prefix, bus channel and
// JWT secret; its processes can be killed and restarted on the same ports.
//
// Environment: CHAT_LOCAL_BIN (default: $CARGO_TARGET_DIR or
// ~/.cache/chat-backend/target, then debug/chat-local), DATABASE_URL (any
// database on the server; default postgres://postgres@127.0.0.1:5432/postgres),
// REDIS_URL (default redis://127.0.0.1:6379). Anything missing FAILS the
// tests: they never skip.

import { spawn, execFileSync } from "node:child_process";
import { createHmac, randomBytes } from "node:crypto";
import { existsSync, mkdtempSync, openSync, readFileSync } from "node:fs";
import { createServer } from "node:net";
import { homedir, tmpdir } from "node:os";
import { join } from "node:path";
import WebSocket from "ws";
import { connect } from "../dist/index.js";

export function chatLocalBin() {
  const target = process.env.CARGO_TARGET_DIR || join(homedir(), ".cache/chat-backend/target");
  const bin = process.env.CHAT_LOCAL_BIN || join(target, "debug/chat-local");
  if (!existsSync(bin)) {
    throw new Error(`chat-local not found at ${bin}: build it (cargo build -p chat-local) or set CHAT_LOCAL_BIN`);
  }
  return bin;
}

const ADMIN_DB_URL = process.env.DATABASE_URL || "postgres://postgres@127.0.0.1:5432/postgres";
const REDIS_URL = process.env.REDIS_URL || "redis://127.0.0.1:6379";

function dbUrl(name) {
  const u = new URL(ADMIN_DB_URL);
  u.pathname = `/${name}`;
  return u.toString();
}

export function freePort() {
  return new Promise((resolve, reject) => {
    const s = createServer();
    s.on("error", reject);
    s.listen(0, "127.0.0.1", () => {
      const { port } = s.address();
      s.close(() => resolve(port));
    });
  });
}

export const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

/** Polls `fn` until it returns a truthy value; fails after `ms`. */
export async function waitFor(what, fn, ms = 20000, every = 50) {
  const deadline = Date.now() + ms;
  for (;;) {
    const v = await fn();
    if (v) return v;
    if (Date.now() > deadline) throw new Error(`timed out after ${ms} ms waiting for ${what}`);
    await sleep(every);
  }
}

/** An HS256 JWT signed with `secret` (for tokens chat-local cannot mint, e.g. already expired). */
export function mintJwt(secret, claims) {
  const b64 = (o) => Buffer.from(JSON.stringify(o)).toString("base64url");
  const head = `${b64({ alg: "HS256", typ: "JWT" })}.${b64(claims)}`;
  return `${head}.${createHmac("sha256", secret).update(head).digest("base64url")}`;
}

export class Stack {
  constructor({ retention = 100, env = {} } = {}) {
    this.bin = chatLocalBin();
    const suffix = randomBytes(6).toString("hex");
    this.db = `chat_test_client_${suffix}`;
    this.prefix = `client-test:${suffix}:`;
    this.secret = `client-test-secret-${suffix}`;
    this.dir = mkdtempSync(join(tmpdir(), "chat-client-test-"));
    this.env = {
      ...process.env,
      DATABASE_URL: dbUrl(this.db),
      REDIS_URL,
      REDIS_KEY_PREFIX: this.prefix,
      BROADCAST_CHANNEL: `${this.prefix}broadcast`,
      JWT_SECRET: this.secret,
      MESSAGE_RETENTION: String(retention),
      RATE_LIMIT_PER_SEC: "0",
      REST_RATE_LIMIT_PER_SEC: "0",
      RUST_LOG: process.env.RUST_LOG || "warn",
      LOG_FORMAT: "pretty",
      // A standalone relay may call only allowed Management API endpoints:
      // here, the gateways' management listeners on this machine.
      RELAY_ALLOWED_ENDPOINTS: "http://127.0.0.1:*/local",
      ...env,
    };
    delete this.env.CHAT_LOCAL_BIN;
    this.procs = new Map(); // name -> {child, args, port, log}
    this.clients = [];
    execFileSync("psql", [ADMIN_DB_URL, "-X", "-w", "-q", "-v", "ON_ERROR_STOP=1", "-c", `CREATE DATABASE "${this.db}"`]);
  }

  /** Starts `chat-local serve` as `name` (on the same port again after a kill) and waits for /health. */
  async startGateway(name = "gateway", { relay = true, migrate = true, port } = {}) {
    const prev = this.procs.get(name);
    port = port ?? prev?.port ?? (await freePort());
    const args = ["serve", "--listen", `127.0.0.1:${port}`];
    if (!relay) args.push("--no-relay");
    if (!migrate) args.push("--no-migrate");
    this.spawn(name, args, { INSTANCE_ID: `${name}-${port}` }, port);
    await waitFor(`${name} /health`, async () => {
      this.assertAlive(name);
      try {
        const r = await fetch(`http://127.0.0.1:${port}/health`);
        return r.ok;
      } catch {
        return false;
      }
    }, 60000, 100);
    return port;
  }

  /** Starts a standalone relay (`chat-local relay`) as `name`. */
  async startRelay(name = "relay") {
    this.spawn(name, ["relay"], { INSTANCE_ID: name }, null);
    await sleep(1500); // it subscribes to the bus within a few hundred ms
    this.assertAlive(name);
  }

  spawn(name, args, env, port) {
    const log = join(this.dir, `${name}.log`);
    const fd = openSync(log, "a");
    const child = spawn(this.bin, args, { env: { ...this.env, ...env }, stdio: ["ignore", fd, fd] });
    const entry = { child, args, port, log, exited: false };
    child.on("exit", () => (entry.exited = true));
    this.procs.set(name, entry);
  }

  assertAlive(name) {
    const p = this.procs.get(name);
    if (!p || p.exited) {
      const tail = p ? readFileSync(p.log, "utf8").split("\n").slice(-20).join("\n") : "";
      throw new Error(`${name} exited:\n${tail}`);
    }
  }

  port(name = "gateway") {
    return this.procs.get(name).port;
  }

  wsUrl(name = "gateway") {
    return `ws://127.0.0.1:${this.port(name)}/ws`;
  }

  apiUrl(name = "gateway") {
    return `http://127.0.0.1:${this.port(name)}/api/v1/chat`;
  }

  /** SIGKILLs a process (no graceful shutdown: its sockets just die) and waits for it to exit. */
  async kill(name = "gateway") {
    const p = this.procs.get(name);
    if (!p || p.exited) return;
    const gone = new Promise((r) => p.child.once("exit", r));
    p.child.kill("SIGKILL");
    await gone;
  }

  /** `chat-local token USER [--ttl SECS]`. */
  token(user, ttlSeconds) {
    const args = ["token", user];
    if (ttlSeconds !== undefined) args.push("--ttl", String(ttlSeconds));
    return execFileSync(this.bin, args, { env: this.env }).toString().trim();
  }

  /** A REST call as `user`; returns the parsed JSON body (throws on a non-2xx). */
  async rest(user, method, path, body, gateway = [...this.procs.keys()].find((n) => this.procs.get(n).port)) {
    const r = await fetch(`${this.apiUrl(gateway)}${path}`, {
      method,
      headers: { authorization: `Bearer ${this.token(user)}`, "content-type": "application/json" },
      body: body === undefined ? undefined : JSON.stringify(body),
    });
    const text = await r.text();
    if (!r.ok) throw new Error(`${method} ${path}: ${r.status} ${text}`);
    return text ? JSON.parse(text) : null;
  }

  /** A library client for `user` on gateway `name`, with `ws` as its WebSocket. */
  client(user, { gateway = "gateway", tokenProvider, ...options } = {}) {
    const provider = tokenProvider ?? (async () => this.token(user));
    const client = connect(this.wsUrl(gateway), provider, { WebSocket, reconnectInitialDelayMs: 200, reconnectMaxDelayMs: 3000, ...options });
    this.clients.push(client);
    return client;
  }

  /** Closes the clients, stops the processes, drops the database and the Redis keys. */
  async destroy() {
    for (const c of this.clients) c.close();
    for (const [, p] of this.procs) {
      if (p.exited) continue;
      const gone = new Promise((r) => p.child.once("exit", r));
      p.child.kill("SIGTERM");
      const t = setTimeout(() => p.child.kill("SIGKILL"), 5000);
      await gone;
      clearTimeout(t);
    }
    try {
      execFileSync("psql", [ADMIN_DB_URL, "-X", "-w", "-q", "-c", `DROP DATABASE IF EXISTS "${this.db}" WITH (FORCE)`]);
    } catch (e) {
      console.error(`could not drop ${this.db}: ${e.message}`);
    }
    try {
      execFileSync("sh", ["-c", `redis-cli -u "$1" --scan --pattern "$2*" | xargs -r -n 500 redis-cli -u "$1" del >/dev/null`, "sh", REDIS_URL, this.prefix]);
    } catch {
      /* best effort */
    }
  }

  logs(name) {
    const p = this.procs.get(name);
    return p ? readFileSync(p.log, "utf8") : "";
  }
}

/** Collects a client's `message` events per room. */
export function recordMessages(client) {
  const byRoom = new Map();
  client.on("message", (m) => {
    if (!byRoom.has(m.roomId)) byRoom.set(m.roomId, []);
    byRoom.get(m.roomId).push(m);
  });
  return (roomId) => byRoom.get(roomId) ?? [];
}
