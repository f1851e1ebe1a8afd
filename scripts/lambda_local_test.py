#!/usr/bin/env python3
"""End-to-end cases against the deployed shape (scripts/lambda-local.sh):
every request goes API Gateway emulator -> Lambda Invoke API -> a function
binary. scripts/test-lambda-local.sh runs it, after scripts/smoke.sh (health,
chat between two clients through the relay, history, presence) against the
same stack.

    lambda_local_test.py --ws WS_URL --rest REST_URL --chat-local BIN

Tokens are minted with `BIN token USER` (JWT_SECRET from the environment).
The named cases, each printing one line:

  refused_connect     a handshake with a bad token or none is refused with
                      401 by ws-connect, and one with a good token succeeds
  recovery            bob drops while alice sends; he reconnects and rejoins
                      with afterSequenceId and gets exactly what he missed
  presence_offline    bob's last connection closes: alice, in a room with
                      him, gets presenceUpdate offline (ws-disconnect)
  function_panic      a $default invocation panics (the test-panic trigger,
                      compiled in only with the feature): the client gets
                      API Gateway's "Internal server error" frame, the
                      connection stays open and the next invocation works
  http_api_errors     the HTTP API emulator: a function's own error status
                      passes through, an unrouted path is 404 {"message":
                      "Not Found"} as an HTTP API answers

Exit code 0 when every case passed, 1 at the first failure.
"""

import argparse
import asyncio
import json
import subprocess
import sys

import websockets

from rest_call import rest_call

WAIT = 15.0
PANIC_TRIGGER = '{"type":"__testPanic"}'


class Failure(Exception):
    pass


def expect(cond, what):
    if not cond:
        raise Failure(what)


class Ctx:
    def __init__(self, ws, rest, chat_local):
        self.ws, self.rest, self.bin = ws, rest.rstrip("/"), chat_local
        self.tokens = {}

    def token(self, user):
        if user not in self.tokens:
            self.tokens[user] = subprocess.check_output([self.bin, "token", user], text=True).strip()
        return self.tokens[user]

    def http(self, method, path, user=None, body=None):
        token = self.token(user) if user else None
        return rest_call(self.rest, method, path, token, body, timeout=WAIT)

    async def connect(self, user):
        ws = await websockets.connect(f"{self.ws}?token={self.token(user)}", open_timeout=WAIT)
        await until(ws, lambda m: m.get("type") == "connected", f"{user}: connected")
        return ws


async def until(ws, pred, what):
    """Reads frames until one matches `pred`; fails after WAIT seconds."""
    seen = []
    try:
        async with asyncio.timeout(WAIT):
            while True:
                frame = json.loads(await ws.recv())
                if pred(frame):
                    return frame
                kind = frame.get("type")
                seen.append(f"error {frame['payload'].get('code')}" if kind == "error" else kind or frame)
    except TimeoutError:
        raise Failure(f"no {what} within {WAIT} s (saw {seen[-8:]})") from None


async def send(ws, kind, payload):
    await ws.send(json.dumps({"type": kind, "payload": payload}))


async def direct_room(ctx, a, b, a_name, b_name):
    # A user is known once they have called the API (as in smoke.py).
    for user in (a_name, b_name):
        status, body = ctx.http("GET", "/api/v1/chat/rooms", user=user)
        expect(status == 200, f"{user}: GET /rooms answered {status} {body}")
    await send(a, "joinRoom", {"targetUserId": b_name})
    joined = await until(a, lambda m: m.get("type") == "roomJoined", f"{a_name}: roomJoined")
    room = joined["payload"]["room"]["id"]
    await send(b, "joinRoom", {"roomId": room})
    await until(b, lambda m: m.get("type") == "roomJoined", f"{b_name}: roomJoined")
    return room


async def refused_connect(ctx):
    for label, url in (("a bad token", f"{ctx.ws}?token=not-a-jwt"), ("no token", ctx.ws)):
        try:
            ws = await websockets.connect(url, open_timeout=WAIT)
        except websockets.exceptions.InvalidStatus as err:
            status = err.response.status_code
            expect(status == 401, f"{label}: refused with {status}, not 401")
            body = json.loads(err.response.body or b"{}")
            expect(body.get("error", {}).get("code") == "UNAUTHORIZED",
                   f"{label}: the refusal's body is ws-connect's error, got {err.response.body!r}")
        else:
            await ws.close()
            raise Failure(f"a handshake with {label} was accepted")
    ws = await ctx.connect("lambda-carol")
    await ws.close()
    return "bad token and no token refused with 401 UNAUTHORIZED; a good token connects"


async def recovery(ctx):
    alice = await ctx.connect("lambda-alice")
    bob = await ctx.connect("lambda-bob")
    room = await direct_room(ctx, alice, bob, "lambda-alice", "lambda-bob")
    await send(alice, "sendMessage", {"roomId": room, "content": "before", "clientMessageId": "r-0"})
    first = await until(bob, lambda m: m.get("type") == "message", "bob: the first message")
    last_seen = first["payload"]["sequenceId"]
    await bob.close()
    missed = []
    for i in range(3):
        await send(alice, "sendMessage", {"roomId": room, "content": f"while away {i}",
                                          "clientMessageId": f"r-{i + 1}"})
        ack = await until(alice, lambda m: m.get("type") == "message"
                          and m["payload"].get("clientMessageId") == f"r-{i + 1}", "alice: her ack")
        missed.append(ack["payload"]["sequenceId"])
    bob = await ctx.connect("lambda-bob")
    await send(bob, "joinRoom", {"roomId": room, "afterSequenceId": last_seen})
    joined = await until(bob, lambda m: m.get("type") == "roomJoined", "bob: roomJoined after reconnect")
    got = [m["sequenceId"] for m in joined["payload"]["messages"]]
    expect(got == missed, f"recovered {got}, expected exactly the missed {missed}")
    expect(joined["payload"].get("recovered") is True, f"recovered flag: {joined['payload'].get('recovered')}")
    await alice.close()
    await bob.close()
    return f"bob rejoined after sequence {last_seen} and recovered {missed}"


async def presence_offline(ctx):
    alice = await ctx.connect("lambda-dora")
    bob = await ctx.connect("lambda-erin")
    await direct_room(ctx, alice, bob, "lambda-dora", "lambda-erin")
    await bob.close()
    update = await until(alice, lambda m: m.get("type") == "presenceUpdate"
                         and m["payload"].get("userId") == "lambda-erin"
                         and m["payload"].get("status") == "offline", "dora: erin offline")
    await alice.close()
    return f"dora saw erin go offline at {update['payload'].get('timestamp')}"


async def function_panic(ctx):
    ws = await ctx.connect("lambda-frank")
    await ws.send(PANIC_TRIGGER)
    failed = await until(ws, lambda m: "message" in m and "type" not in m, "the integration error frame")
    expect(failed["message"] == "Internal server error" and failed.get("connectionId")
           and failed.get("requestId"), f"not API Gateway's error frame: {failed}")
    for _ in range(2):
        await send(ws, "ping", {})
        await until(ws, lambda m: m.get("type") == "pong", "pong after the panic")
    await ws.close()
    return "the panicking invocation got 'Internal server error'; the next invocations answered pong"


async def http_api_errors(ctx):
    status, body = ctx.http("GET", "/api/v1/chat/rooms")
    expect(status == 401 and isinstance(body, dict) and body.get("error", {}).get("code") == "UNAUTHORIZED",
           f"no token: the rest function's 401, got {status} {body}")
    status, body = ctx.http("GET", "/api/v1/chat/rooms", user="lambda-gina")
    expect(status == 200 and "rooms" in body, f"GET /rooms: {status} {body}")
    status, body = ctx.http("GET", "/not-routed")
    expect(status == 404 and body == {"message": "Not Found"}, f"unrouted path: {status} {body}")
    return "401 from rest passed through, 200 with a token, 404 {\"message\":\"Not Found\"} off the routes"


CASES = [refused_connect, recovery, presence_offline, function_panic, http_api_errors]


async def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--ws", required=True)
    parser.add_argument("--rest", required=True)
    parser.add_argument("--chat-local", required=True)
    args = parser.parse_args()
    ctx = Ctx(args.ws, args.rest, args.chat_local)
    for case in CASES:
        try:
            detail = await case(ctx)
        except Failure as err:
            print(f"lambda-test: FAILED {case.__name__}: {err}", file=sys.stderr, flush=True)
            return 1
        print(f"lambda-test: ok  {case.__name__}: {detail}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
