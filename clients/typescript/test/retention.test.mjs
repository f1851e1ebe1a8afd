// MESSAGE_RETENTION=5: a client that misses 3 messages gets them back from
// the rejoin (recovered: true, no reload); one that misses 8 gets the
// `reloaded` signal with the fresh snapshot, since retention deleted some.
import { test } from "node:test";
import assert from "node:assert/strict";
import { Stack, recordMessages, waitFor } from "./stack.mjs";

function deferred() {
  let resolve;
  const promise = new Promise((r) => (resolve = r));
  return { promise, resolve };
}

test("a retention gap gives reloaded; a short gap is recovered", { timeout: 120000 }, async (t) => {
  const stack = new Stack({ retention: 5 });
  t.after(() => stack.destroy());
  await stack.startGateway();

  // While `gate` is set, alice's token provider waits: she stays offline.
  let gate = null;
  const alice = stack.client("alice", {
    tokenProvider: async () => {
      if (gate) await gate.promise;
      return stack.token("alice");
    },
  });
  const bob = stack.client("bob");
  t.after(() => {
    alice.close();
    bob.close();
  });
  const seen = recordMessages(alice);
  const reloads = [];
  const rejoins = [];
  alice.on("reloaded", (r) => reloads.push(r));
  alice.on("roomJoined", (p) => p.rejoin && rejoins.push(p));
  await Promise.all([alice.ready(), bob.ready()]);
  const { room } = await alice.join({ targetUserId: "bob" });

  await bob.send(room.id, "one");
  await bob.send(room.id, "two");
  await waitFor("alice to see 2", () => seen(room.id).length === 2);

  const offlineWhile = async (n, label) => {
    gate = deferred();
    alice.reconnect();
    await waitFor("alice offline", () => alice.state === "reconnecting");
    for (let i = 0; i < n; i++) await bob.send(room.id, `${label} ${i}`);
    const g = gate;
    gate = null;
    g.resolve();
  };

  // A short gap (3 < 5): recovered, the missed messages arrive as message events.
  await offlineWhile(3, "short");
  await waitFor("alice to recover 3", () => seen(room.id).length === 5);
  assert.equal(rejoins.length, 1);
  assert.equal(rejoins[0].recovered, true);
  assert.deepEqual(seen(room.id).map((m) => m.sequenceId), [1, 2, 3, 4, 5]);
  assert.deepEqual(reloads, []);

  // A long gap (8 > 5): retention deleted some of them, so the room is reloaded.
  await offlineWhile(8, "long");
  await waitFor("the reloaded signal", () => reloads.length === 1);
  const [r] = reloads;
  assert.equal(r.roomId, room.id);
  assert.equal(r.snapshot.recovered, false);
  assert.deepEqual(r.snapshot.messages.map((m) => m.sequenceId), [9, 10, 11, 12, 13]);
  assert.equal(alice.getRoom(room.id).lastSequenceId, 13);

  // Live delivery goes on after the reload, from the snapshot's newest.
  await bob.send(room.id, "after the reload");
  await waitFor("the next live message", () => seen(room.id).some((m) => m.content === "after the reload"));
  assert.deepEqual(seen(room.id).map((m) => m.sequenceId), [1, 2, 3, 4, 5, 14], "the deleted gap is not replayed as messages");
});
