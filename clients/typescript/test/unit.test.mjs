// Behaviours that the real stack never shows on demand (out-of-order
// frames, duplicates, retryable errors), against a scripted fake socket.
import { test } from "node:test";
import assert from "node:assert/strict";
import { connect, tokenExpiryMs, randomId, ChatError } from "../dist/index.js";
import { mintJwt, sleep, waitFor } from "./stack.mjs";

class FakeSocket {
  static all = [];
  constructor(url) {
    this.url = url;
    this.readyState = 0;
    this.sent = [];
    this.onopen = this.onclose = this.onerror = this.onmessage = null;
    FakeSocket.all.push(this);
  }
  send(data) {
    this.sent.push(JSON.parse(data));
  }
  close(code = 1000, reason = "") {
    if (this.readyState === 3) return;
    this.readyState = 3;
    this.onclose?.({ code, reason });
  }
  // the "server" side
  open() {
    this.readyState = 1;
    this.onopen?.({});
  }
  push(type, payload) {
    this.onmessage?.({ data: JSON.stringify({ type, payload }) });
  }
  frames(type) {
    return this.sent.filter((f) => f.type === type);
  }
}

const msg = (roomId, sequenceId, extra = {}) => ({
  id: `m${sequenceId}`, roomId, senderId: "bob", content: `#${sequenceId}`, type: "text", metadata: null,
  sequenceId, clientMessageId: null, sender: { id: "bob", username: "bob", displayName: null, avatar: null },
  readBy: [], createdAt: new Date().toISOString(), ...extra,
});
const room = (id) => ({ id, type: "GROUP", name: "g", members: [{ id: "me" }, { id: "bob" }, { id: "eve" }] });

async function setup(options = {}) {
  FakeSocket.all = [];
  const client = connect("ws://fake/ws", async () => "tok", { WebSocket: FakeSocket, reconnectInitialDelayMs: 10, random: () => 0.5, ...options });
  await waitFor("a socket", () => FakeSocket.all.length === 1);
  const ws = FakeSocket.all[0];
  ws.open();
  ws.push("connected", { userId: "me", connectionId: "c1", timestamp: "" });
  return { client, ws };
}

test("tokenExpiryMs reads exp without verifying; ids are short and random", () => {
  const exp = Math.floor(Date.now() / 1000) + 60;
  assert.equal(tokenExpiryMs(mintJwt("x", { sub: "u", exp })), exp * 1000);
  assert.equal(tokenExpiryMs("not a jwt"), null);
  assert.equal(tokenExpiryMs(mintJwt("x", { sub: "u" })), null);
  const a = randomId();
  assert.ok(a.length <= 64 && a !== randomId());
});

test("the token goes in the query string, and the url keeps its own query", async () => {
  FakeSocket.all = [];
  const c = connect("ws://fake/ws?x=1", async () => "a.b.c", { WebSocket: FakeSocket });
  await waitFor("a socket", () => FakeSocket.all.length === 1);
  assert.equal(FakeSocket.all[0].url, "ws://fake/ws?x=1&token=a.b.c");
  c.close();
});

test("messages are delivered once each and in sequenceId order", async () => {
  const { client, ws } = await setup({ reorderWindowMs: 100 });
  const got = [];
  client.on("message", (m) => got.push(m.sequenceId));
  const joined = client.join("r1");
  assert.deepEqual(ws.frames("joinRoom")[0].payload, { roomId: "r1" });
  ws.push("message", msg("r1", 4)); // before roomJoined: buffered
  ws.push("roomJoined", { room: room("r1"), messages: [msg("r1", 2), msg("r1", 3)], unreadCount: 0, onlineUsers: ["me"], hasMore: false });
  assert.equal((await joined).messages.length, 2);
  ws.push("message", msg("r1", 6));
  ws.push("message", msg("r1", 5));
  ws.push("message", msg("r1", 5));
  ws.push("message", msg("r1", 3));
  ws.push("message", msg("r1", 9)); // 7, 8 never come: delivered after the window
  await sleep(250);
  assert.deepEqual(got, [4, 5, 6, 9]);
  client.close();
});

test("after a reconnect each room is rejoined with afterSequenceId; sends wait for it", async () => {
  const { client, ws } = await setup();
  const got = [];
  client.on("message", (m) => got.push(m.sequenceId));
  const j = client.join("r1");
  ws.push("roomJoined", { room: room("r1"), messages: [msg("r1", 1)], unreadCount: 0, onlineUsers: [], hasMore: false });
  await j;
  ws.push("message", msg("r1", 2));
  ws.close(1006, "");
  const sending = client.send("r1", "hi");
  await waitFor("a second socket", () => FakeSocket.all.length === 2);
  const ws2 = FakeSocket.all[1];
  ws2.open();
  assert.deepEqual(ws2.frames("joinRoom").map((f) => f.payload), [{ roomId: "r1", afterSequenceId: 2 }]);
  assert.equal(ws2.frames("sendMessage").length, 0, "sends wait for the rejoins");
  ws2.push("roomJoined", { room: room("r1"), messages: [msg("r1", 3)], unreadCount: 0, onlineUsers: [], hasMore: true, recovered: true });
  // hasMore: the next page is asked for before the sends go
  assert.deepEqual(ws2.frames("joinRoom")[1].payload, { roomId: "r1", afterSequenceId: 3 });
  ws2.push("roomJoined", { room: room("r1"), messages: [msg("r1", 4)], unreadCount: 0, onlineUsers: [], hasMore: false, recovered: true });
  const [send] = ws2.frames("sendMessage");
  assert.equal(send.payload.content, "hi");
  ws2.push("message", msg("r1", 5, { senderId: "me", clientMessageId: send.payload.clientMessageId }));
  assert.equal((await sending).sequenceId, 5);
  assert.deepEqual(got, [2, 3, 4, 5]);
  client.close();
});

test("RATE_LIMITED is retried after retryAfterMs with the same clientMessageId; FORBIDDEN rejects", async () => {
  const { client, ws } = await setup();
  const p = client.send("r1", "hello");
  const [first] = ws.frames("sendMessage");
  const cmid = first.payload.clientMessageId;
  ws.push("error", { code: "RATE_LIMITED", message: "slow down", requestType: "sendMessage", clientMessageId: cmid, retryAfterMs: 150 });
  await sleep(100);
  assert.equal(ws.frames("sendMessage").length, 1, "not before retryAfterMs");
  await waitFor("the retry", () => ws.frames("sendMessage").length === 2);
  assert.equal(ws.frames("sendMessage")[1].payload.clientMessageId, cmid);
  ws.push("message", msg("r1", 1, { senderId: "me", clientMessageId: cmid }));
  assert.equal((await p).sequenceId, 1);

  const q = client.send("r2", "nope");
  const cmid2 = ws.frames("sendMessage")[2].payload.clientMessageId;
  ws.push("error", { code: "FORBIDDEN", message: "not a member", requestType: "sendMessage", clientMessageId: cmid2 });
  await assert.rejects(q, (e) => e instanceof ChatError && e.code === "FORBIDDEN");
  await sleep(50);
  assert.equal(ws.frames("sendMessage").length, 3, "never retried");
  client.close();
});

test("presence and typing state per room", async () => {
  const { client, ws } = await setup({ typingTimeoutMs: 100 });
  const j = client.join("r1");
  ws.push("roomJoined", { room: room("r1"), messages: [], unreadCount: 0, onlineUsers: ["me", "bob"], hasMore: false });
  await j;
  assert.deepEqual(client.getRoom("r1").onlineUsers, ["bob", "me"]);
  ws.push("presenceUpdate", { userId: "eve", status: "online", timestamp: "" });
  ws.push("presenceUpdate", { userId: "bob", status: "offline", timestamp: "" });
  ws.push("presenceUpdate", { userId: "stranger", status: "online", timestamp: "" });
  assert.deepEqual(client.getRoom("r1").onlineUsers, ["eve", "me"]);
  ws.push("typing", { roomId: "r1", userId: "eve", username: "eve", isTyping: true });
  assert.deepEqual(client.getRoom("r1").typingUsers, ["eve"]);
  await sleep(200);
  assert.deepEqual(client.getRoom("r1").typingUsers, [], "typing times out");
  client.close();
});

test("a message from a typist ends their typing", async () => {
  const { client, ws } = await setup();
  const changes = [];
  client.on("typingUsers", (t) => changes.push(t.userIds));
  const j = client.join("r1");
  ws.push("roomJoined", { room: room("r1"), messages: [], unreadCount: 0, onlineUsers: [], hasMore: false });
  await j;
  ws.push("typing", { roomId: "r1", userId: "bob", username: "bob", isTyping: true });
  ws.push("typing", { roomId: "r1", userId: "eve", username: "eve", isTyping: true });
  ws.push("message", msg("r1", 1, { senderId: "bob" }));
  assert.deepEqual(client.getRoom("r1").typingUsers, ["eve"]);
  ws.push("typing", { roomId: "r1", userId: "eve", username: "eve", isTyping: false });
  ws.push("typing", { roomId: "r1", userId: "eve", username: "eve", isTyping: false });
  assert.deepEqual(changes, [["bob"], ["bob", "eve"], ["eve"], []]);
  client.close();
});

test("dropConnection() drops the socket as a failed network would, then reconnects with backoff and rejoins", async () => {
  const { client, ws } = await setup({ reconnectInitialDelayMs: 200 });
  const j = client.join("r1");
  ws.push("roomJoined", { room: room("r1"), messages: [msg("r1", 1)], unreadCount: 0, onlineUsers: [], hasMore: false });
  await j;
  const seen = [];
  client.on("disconnected", (d) => seen.push(["disconnected", d.code]));
  client.on("reconnecting", (r) => seen.push(["reconnecting", r.attempt, r.delayMs]));
  client.dropConnection();
  // Synchronously: the events, the state, and the old socket closed.
  assert.deepEqual(seen, [["disconnected", 1006], ["reconnecting", 1, 150]]);
  assert.equal(client.state, "reconnecting");
  assert.equal(ws.readyState, 3);
  assert.equal(ws.onmessage, null, "the old socket is given up");
  await sleep(100);
  assert.equal(FakeSocket.all.length, 1, "not before the backoff");
  await waitFor("a new socket", () => FakeSocket.all.length === 2);
  const ws2 = FakeSocket.all[1];
  ws2.open();
  assert.deepEqual(ws2.frames("joinRoom").map((f) => f.payload), [{ roomId: "r1", afterSequenceId: 1 }]);
  client.close();
});

test("reconnect() while waiting for the next attempt makes it now", async () => {
  const { client, ws } = await setup({ reconnectInitialDelayMs: 60000 });
  ws.close(1006, "");
  assert.equal(client.state, "reconnecting");
  await sleep(20);
  assert.equal(FakeSocket.all.length, 1, "waiting out the backoff");
  client.reconnect();
  await waitFor("a new socket at once", () => FakeSocket.all.length === 2, 1000);
  client.close();
});

test("markRead while offline or rejoining is kept, the newest per room, and sent after the rejoins", async () => {
  const { client, ws } = await setup();
  const j = client.join("r1");
  ws.push("roomJoined", { room: room("r1"), messages: [msg("r1", 1)], unreadCount: 0, onlineUsers: [], hasMore: false });
  await j;
  client.markRead("r1", 1);
  assert.deepEqual(ws.frames("markRead").map((f) => f.payload), [{ roomId: "r1", sequenceId: 1 }], "online: at once");
  ws.close(1006, "");
  client.markRead("r1", 3);
  client.markRead("r1", 2);
  client.markRead("r2", 7);
  const sending = client.send("r1", "written offline");
  await waitFor("a second socket", () => FakeSocket.all.length === 2);
  const ws2 = FakeSocket.all[1];
  ws2.open();
  client.markRead("r1", 4); // rejoining: kept too
  assert.equal(ws2.frames("markRead").length, 0, "not before the rejoins");
  ws2.push("roomJoined", { room: room("r1"), messages: [msg("r1", 2), msg("r1", 3), msg("r1", 4)], unreadCount: 0, onlineUsers: [], hasMore: false, recovered: true });
  assert.deepEqual(ws2.frames("markRead").map((f) => f.payload), [{ roomId: "r1", sequenceId: 4 }, { roomId: "r2", sequenceId: 7 }]);
  // Reads before sends: a send moves the sender's cursor, and a read behind it would not reach the others.
  assert.deepEqual(ws2.sent.map((f) => f.type), ["joinRoom", "markRead", "markRead", "sendMessage"]);
  client.markRead("r1", 4);
  assert.equal(ws2.frames("markRead").length, 3, "online again: at once");
  client.close();
  await assert.rejects(sending, /client closed/);
});

test("no pong in time replaces the socket", async () => {
  const { client, ws } = await setup({ pingIntervalMs: 50, pongTimeoutMs: 50 });
  await waitFor("a ping", () => ws.frames("ping").length >= 1);
  await waitFor("a new socket", () => FakeSocket.all.length === 2);
  client.close();
});

test("close() rejects what is pending", async () => {
  const { client } = await setup();
  const p = client.send("r1", "x");
  client.close();
  await assert.rejects(p, /client closed/);
  assert.equal(client.state, "closed");
});

test("token renewal: authenticate when the server answers it, else a reconnect with a fresh token", async () => {
  FakeSocket.all = [];
  let calls = 0;
  const provider = async () => {
    calls++;
    return mintJwt("s", { sub: "me", exp: Math.floor(Date.now() / 1000) + 2 });
  };
  const client = connect("ws://fake/ws", provider, { WebSocket: FakeSocket, reconnectInitialDelayMs: 10 });
  await waitFor("a socket", () => FakeSocket.all.length === 1);
  const ws = FakeSocket.all[0];
  ws.open();
  // Renewed before exp (at most a fifth of its life before it).
  await waitFor("authenticate", () => ws.frames("authenticate").length === 1, 3000);
  assert.equal(calls, 2);
  ws.push("authenticated", { exp: Math.floor(Date.now() / 1000) + 2 });
  await waitFor("the next authenticate", () => ws.frames("authenticate").length === 2, 3000);
  assert.equal(FakeSocket.all.length, 1, "no reconnect while authenticate works");
  // A server without authenticate: BAD_REQUEST, and the client renews by reconnecting.
  ws.push("error", { code: "BAD_REQUEST", message: "unknown type", requestType: "authenticate", clientMessageId: null });
  await waitFor("a new socket", () => FakeSocket.all.length === 2);
  assert.equal(calls, 4, "a fresh token for the new socket");
  client.close();
});

test("UNAUTHORIZED closes the socket and reconnects with a fresh token; the send goes again", async () => {
  const { client, ws } = await setup();
  const p = client.send("r1", "hi");
  const cmid = ws.frames("sendMessage")[0].payload.clientMessageId;
  ws.push("error", { code: "UNAUTHORIZED", message: "token expired", requestType: "sendMessage", clientMessageId: cmid });
  await waitFor("a new socket", () => FakeSocket.all.length === 2);
  const ws2 = FakeSocket.all[1];
  ws2.open();
  assert.equal(ws2.frames("sendMessage")[0].payload.clientMessageId, cmid, "same clientMessageId");
  ws2.push("message", msg("r1", 1, { senderId: "me", clientMessageId: cmid }));
  assert.equal((await p).content, "#1");
  client.close();
});

test("a close with 4001 (token expired) reconnects at once with a fresh token", async () => {
  FakeSocket.all = [];
  let calls = 0;
  const client = connect("ws://fake/ws", async () => `t${++calls}`, { WebSocket: FakeSocket, reconnectInitialDelayMs: 5000 });
  await waitFor("a socket", () => FakeSocket.all.length === 1);
  FakeSocket.all[0].open();
  FakeSocket.all[0].close(4001, "token expired");
  await waitFor("a new socket without the 5 s backoff", () => FakeSocket.all.length === 2, 1000);
  assert.equal(FakeSocket.all[1].url, "ws://fake/ws?token=t2");
  client.close();
});

test("the package loads as ES module and as CommonJS", async () => {
  const { createRequire } = await import("node:module");
  const cjs = createRequire(import.meta.url)("@chat-backend/client");
  const esm = await import("@chat-backend/client");
  assert.equal(typeof cjs.connect, "function");
  assert.equal(typeof esm.connect, "function");
  assert.ok(cjs.RETRYABLE_CODES.has("RATE_LIMITED"));
});

test("frames but ping are numbered per socket; a CONFLICT send goes again with a new number", async () => {
  const { client, ws } = await setup({ pingIntervalMs: 20 });
  const a = client.send("r1", "a");
  const b = client.send("r1", "b");
  client.typing("r1", true);
  await waitFor("a ping", () => ws.frames("ping").length > 0);
  assert.equal(ws.frames("ping")[0].seq, undefined, "pings are not numbered");
  const numbered = ws.sent.filter((f) => f.type !== "ping");
  assert.deepEqual(numbered.map((f) => [f.type, f.seq]), [["sendMessage", 1], ["sendMessage", 2], ["typing", 3]]);
  // The server handled a later frame before "a" arrived: it is sent again,
  // numbered after everything sent so far, with the same clientMessageId.
  const [first, second] = ws.frames("sendMessage");
  ws.push("error", { code: "CONFLICT", message: "late", requestType: "sendMessage", clientMessageId: first.payload.clientMessageId });
  await waitFor("the resend", () => ws.frames("sendMessage").length === 3);
  const resent = ws.frames("sendMessage")[2];
  assert.equal(resent.payload.clientMessageId, first.payload.clientMessageId);
  assert.equal(resent.seq, 4);
  ws.push("message", msg("r1", 1, { senderId: "me", clientMessageId: second.payload.clientMessageId }));
  ws.push("message", msg("r1", 2, { senderId: "me", clientMessageId: first.payload.clientMessageId }));
  assert.equal((await b).sequenceId, 1);
  assert.equal((await a).sequenceId, 2);
  // A new socket numbers from 1 again.
  ws.close(1006, "");
  await waitFor("a second socket", () => FakeSocket.all.length === 2);
  const ws2 = FakeSocket.all[1];
  ws2.open();
  client.typing("r1", false);
  assert.deepEqual(ws2.sent.filter((f) => f.type !== "ping").map((f) => f.seq), [1]);
  client.close();
});

test("a frame of a type the client does not know is ignored, even one named like an Object member", async () => {
  const { client, ws } = await setup();
  const warnings = [];
  const receipts = [];
  client.on("warning", (w) => warnings.push(w.message));
  client.on("readReceipt", (r) => receipts.push(r.sequenceId));
  for (const type of ["someNewEvent", "__proto__", "toString", "constructor", "hasOwnProperty"]) {
    ws.push(type, { roomId: "r1" });
  }
  ws.push("readReceipt", { roomId: "r1", userId: "bob", sequenceId: 7 });
  assert.deepEqual(receipts, [7]);
  assert.deepEqual(warnings, []);
  assert.equal(client.state, "open");
  client.close();
});

test("API Gateway's own error frame: what is unanswered goes again after 1 s, sends with the same clientMessageId", async () => {
  const { client, ws } = await setup();
  const warnings = [];
  client.on("warning", (w) => warnings.push(w.message));
  const joined = client.join("r1");
  const sent = client.send("r0", "hello");
  const cmid = ws.frames("sendMessage")[0].payload.clientMessageId;
  // A throttled invocation: API Gateway answers for the function, naming no request.
  ws.onmessage?.({ data: JSON.stringify({ message: "Internal server error", connectionId: "c1", requestId: "r-1" }) });
  assert.match(warnings[0], /Internal server error/);
  await sleep(500);
  assert.equal(ws.frames("joinRoom").length, 1, "not before 1 s");
  assert.equal(ws.frames("sendMessage").length, 1, "not before 1 s");
  await waitFor("the join again", () => ws.frames("joinRoom").length === 2);
  await waitFor("the send again", () => ws.frames("sendMessage").length === 2);
  assert.deepEqual(ws.frames("joinRoom")[1].payload, { roomId: "r1" });
  assert.equal(ws.frames("sendMessage")[1].payload.clientMessageId, cmid);
  ws.push("roomJoined", { room: room("r1"), messages: [], unreadCount: 0, onlineUsers: ["me"], hasMore: false });
  ws.push("message", msg("r0", 1, { senderId: "me", clientMessageId: cmid }));
  assert.equal((await joined).room.id, "r1");
  assert.equal((await sent).sequenceId, 1);
  // Answered requests are not repeated by a later one.
  ws.onmessage?.({ data: JSON.stringify({ message: "Internal server error", connectionId: "c1", requestId: "r-2" }) });
  await sleep(1300);
  assert.equal(ws.frames("joinRoom").length, 2);
  assert.equal(ws.frames("sendMessage").length, 2);
  assert.equal(client.state, "open");
  client.close();
});
