// The gateway a client is connected to is killed (SIGKILL) mid-conversation
// and restarted on the same port, with the same PostgreSQL and Redis. The
// other client, on a second gateway, keeps talking meanwhile (through the
// standalone relay). Afterwards both have every message exactly once, in
// sequenceId order; what was sent while one was away arrived through the
// rejoin's recovery, and the sends made while disconnected settled after the
// reconnect.
import { test } from "node:test";
import assert from "node:assert/strict";
import { Stack, recordMessages, waitFor } from "./stack.mjs";

test("a gateway killed mid-conversation: no message lost, none twice, order kept", { timeout: 180000 }, async (t) => {
  const stack = new Stack();
  t.after(() => stack.destroy());
  await stack.startGateway("gw-a", { relay: false });
  await stack.startGateway("gw-b", { relay: false, migrate: false });
  await stack.startRelay("relay");

  const alice = stack.client("alice", { gateway: "gw-a" });
  const bob = stack.client("bob", { gateway: "gw-b" });
  t.after(() => {
    alice.close();
    bob.close();
  });
  const aliceSeen = recordMessages(alice);
  const bobSeen = recordMessages(bob);
  const reloads = [];
  alice.on("reloaded", (r) => reloads.push(r));
  await Promise.all([alice.ready(), bob.ready()]);

  const joined = await alice.join({ targetUserId: "bob" });
  const roomId = joined.room.id;
  assert.equal(joined.room.type, "DIRECT");
  await bob.join(roomId);

  const contents = [];
  const say = async (client, text) => {
    contents.push(text);
    const echo = await client.send(roomId, text);
    assert.equal(echo.content, text);
    return echo;
  };
  for (let i = 0; i < 5; i++) {
    await say(alice, `alice ${i}`);
    await say(bob, `bob ${i}`);
  }
  await waitFor("alice to see the first 10", () => aliceSeen(roomId).length === 10);

  // Alice's gateway dies.
  await stack.kill("gw-a");
  await waitFor("alice to notice", () => alice.state === "reconnecting");

  // Alice writes while offline: the sends wait for the reconnect.
  contents.push("alice offline 1", "alice offline 2");
  const offline = [alice.send(roomId, "alice offline 1"), alice.send(roomId, "alice offline 2")];
  // Bob keeps talking on his gateway.
  for (let i = 0; i < 5; i++) await say(bob, `bob while alice is away ${i}`);
  assert.equal(aliceSeen(roomId).length, 10, "alice cannot receive while her gateway is down");

  await stack.startGateway("gw-a", { relay: false, migrate: false });
  const echoes = await Promise.all(offline);
  assert.deepEqual(echoes.map((m) => m.content), ["alice offline 1", "alice offline 2"]);
  for (let i = 0; i < 3; i++) {
    await say(alice, `alice back ${i}`);
    await say(bob, `bob again ${i}`);
  }

  const total = contents.length; // 23
  await waitFor("alice to have every message", () => aliceSeen(roomId).length >= total, 30000);
  await waitFor("bob to have every message", () => bobSeen(roomId).length >= total, 30000);
  const expected = Array.from({ length: total }, (_, i) => i + 1);
  for (const [who, seen] of [["alice", aliceSeen(roomId)], ["bob", bobSeen(roomId)]]) {
    assert.deepEqual(seen.map((m) => m.sequenceId), expected, `${who}: every sequenceId once, in order`);
    assert.deepEqual(new Set(seen.map((m) => m.content)), new Set(contents), `${who}: every message`);
    assert.equal(new Set(seen.map((m) => m.id)).size, total, `${who}: no duplicates`);
  }
  // The offline sends were stored once each, whatever was retried.
  const history = await stack.rest("alice", "GET", `/rooms/${roomId}/messages?limit=100`, undefined, "gw-b");
  assert.equal(history.messages.length, total);
  assert.deepEqual(reloads, [], "nothing was lost to retention: no reload");
  assert.deepEqual(alice.joinedRooms(), [roomId]);
});
