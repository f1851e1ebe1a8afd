// A burst of sends without waiting, against the real local stack, whose
// gateway invokes the handler for several frames of one connection at once
// as API Gateway does: the library numbers its frames (`seq`), so the
// messages are stored in the order send() was called.
import { test } from "node:test";
import assert from "node:assert/strict";
import { Stack } from "./stack.mjs";

const N = 40;

test(`${N} sends without waiting are stored in the order sent`, { timeout: 120000 }, async (t) => {
  const stack = new Stack();
  t.after(() => stack.destroy());
  await stack.startGateway();
  await stack.rest("bob", "GET", "/rooms"); // bob is known
  const alice = stack.client("alice");
  t.after(() => alice.close());
  await alice.ready();
  const { room } = await alice.join({ targetUserId: "bob" });
  const sent = [];
  for (let i = 1; i <= N; i++) sent.push(alice.send(room.id, `m${i}`));
  const echoes = await Promise.all(sent);
  const bySequence = [...echoes].sort((a, b) => a.sequenceId - b.sequenceId).map((m) => m.content);
  const want = Array.from({ length: N }, (_, i) => `m${i + 1}`);
  assert.deepEqual(bySequence, want, "acknowledged sequenceIds follow the send order");
  const history = await stack.rest("alice", "GET", `/rooms/${room.id}/messages?limit=100`);
  const stored = history.messages.sort((a, b) => a.sequenceId - b.sequenceId).map((m) => m.content);
  assert.deepEqual(stored, want, "stored in the order sent");
});
