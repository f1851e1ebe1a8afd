// Token refresh: the provider's first token is already expired (the
// handshake is refused with 401), so the client asks it again; the next
// tokens live 3 s, so the client renews before each `exp` (with
// `authenticate` where the server supports it, else by reconnecting), and the
// conversation goes on across renewals with nothing lost.
import { test } from "node:test";
import assert from "node:assert/strict";
import { Stack, mintJwt, recordMessages, sleep, waitFor } from "./stack.mjs";

test("an expired token is refreshed from the provider", { timeout: 120000 }, async (t) => {
  const stack = new Stack();
  t.after(() => stack.destroy());
  await stack.startGateway();
  await stack.rest("dave", "GET", "/rooms"); // dave becomes known

  const calls = [];
  const carol = stack.client("carol", {
    tokenProvider: async () => {
      calls.push(Date.now());
      if (calls.length === 1) {
        return mintJwt(stack.secret, { sub: "carol", exp: Math.floor(Date.now() / 1000) - 60 });
      }
      return stack.token("carol", 3);
    },
  });
  t.after(() => carol.close());
  const seen = recordMessages(carol);
  const renewals = { authenticated: 0, disconnected: 0 };
  carol.on("authenticated", () => renewals.authenticated++);
  carol.on("disconnected", () => renewals.disconnected++);

  await carol.ready();
  assert.ok(calls.length >= 2, "the expired token was replaced by a fresh one");
  const { room } = await carol.join({ targetUserId: "dave" });

  // Keep talking for 8 s: at least two renewals of a 3 s token.
  const sent = [];
  const until = Date.now() + 8000;
  let i = 0;
  while (Date.now() < until) {
    const text = `carol ${i++}`;
    const echo = await carol.send(room.id, text);
    sent.push(echo.sequenceId);
    await stack.rest("dave", "POST", `/rooms/${room.id}/messages`, { content: `dave ${i}` });
    await sleep(400);
  }
  assert.ok(calls.length >= 4, `the provider was asked before each exp (${calls.length} calls)`);
  assert.ok(renewals.authenticated + renewals.disconnected >= 2, `renewed: ${JSON.stringify(renewals)}`);
  t.diagnostic(`provider calls: ${calls.length}, renewals: ${JSON.stringify(renewals)}`);
  assert.equal(carol.state, "open");

  const total = sent.length * 2;
  await waitFor("every message", () => seen(room.id).length >= total, 20000);
  assert.deepEqual(seen(room.id).map((m) => m.sequenceId), Array.from({ length: total }, (_, k) => k + 1));
});
