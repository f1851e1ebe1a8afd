// 500 clients in one process connect, each joins its direct room with `host`;
// the stack is killed and restarted; every client reconnects (with jittered
// backoff) and rejoins with recovery, and receives what is sent afterwards.
import { test } from "node:test";
import assert from "node:assert/strict";
import { Stack, mintJwt, waitFor } from "./stack.mjs";

const N = Number(process.env.CLIENT_TEST_CLIENTS || 500);

test(`${N} clients reconnect together after a restart and all rejoin`, { timeout: 300000 }, async (t) => {
  const stack = new Stack();
  t.after(() => stack.destroy());
  await stack.startGateway();
  await stack.rest("host", "GET", "/rooms");

  // Tokens minted in-process (HS256 with JWT_SECRET): 1,000 runs of
  // `chat-local token` would take longer than the test.
  const token = (user) => mintJwt(stack.secret, { sub: user, exp: Math.floor(Date.now() / 1000) + 3600 });
  const clients = [];
  for (let i = 0; i < N; i++) {
    clients.push(stack.client(`user${i}`, { tokenProvider: async () => token(`user${i}`), reconnectMaxDelayMs: 5000 }));
  }
  t.after(() => clients.forEach((c) => c.close()));
  const rejoined = new Set();
  const received = new Map();
  clients.forEach((c, i) => {
    c.on("roomJoined", (p) => p.rejoin && p.recovered && rejoined.add(i));
    c.on("message", (m) => received.set(i, (received.get(i) ?? 0) + 1));
  });
  await Promise.all(clients.map((c) => c.ready()));
  const rooms = await Promise.all(clients.map((c) => c.join({ targetUserId: "host" })));
  assert.equal(new Set(rooms.map((r) => r.room.id)).size, N, "one direct room each");
  // One message in each room before the restart.
  await Promise.all(clients.map((c, i) => c.send(rooms[i].room.id, `hello from ${i}`)));

  await stack.kill("gateway");
  await waitFor("every client to notice", () => clients.every((c) => c.state === "reconnecting"), 30000);
  const restarted = Date.now();
  await stack.startGateway();
  await waitFor(`all ${N} to rejoin`, () => rejoined.size === N, 180000, 200);
  t.diagnostic(`all ${N} rejoined ${Date.now() - restarted} ms after the restart began`);
  assert.ok(clients.every((c) => c.state === "open"));

  // Each of them can talk again, and a message from host reaches a sample.
  await Promise.all(clients.map((c, i) => c.send(rooms[i].room.id, `back ${i}`)));
  const sample = [0, Math.floor(N / 2), N - 1];
  for (const i of sample) {
    await stack.rest("host", "POST", `/rooms/${rooms[i].room.id}/messages`, { content: "from host" });
  }
  await waitFor("host's messages", () => sample.every((i) => received.get(i) === 3), 30000);
  for (let i = 0; i < N; i++) assert.ok((received.get(i) ?? 0) >= 2, `client ${i} got its echoes`);
});
