#!/usr/bin/env python3
"""End-to-end smoke test of a running deployment (scripts/smoke.sh runs it).

    smoke.py --ws WS_URL --rest REST_URL --token TOKEN [--token2 TOKEN2]

WS_URL is the stack's `WebSocketUrl` output (wss://.../STAGE, or ws:// for
the local stack's /ws); REST_URL its `HttpApiUrl` (the part before
/api/v1/...). TOKEN is a JWT the deployment accepts. With --token2 (another
user's token) the check also runs between two users; without it, between
two connections of the one user.

Checks, each with a deadline, printing one line per step:
  1. GET /health answers ok;
  2. the user(s) become known (GET /rooms), and a GROUP room is created;
  3. two WebSocket clients connect and get `connected` (posted by the relay,
     so the relay's path to the Management API works);
  4. both join the room and get `roomJoined`;
  5. client A sends; both A (its acknowledgement) and B receive the
     `message` through the relay;
  6. REST history has the message with its sequence id;
  7. presence: GET /rooms/{id}/online lists the connected user(s).
Exit code 0 when every step passed, 1 at the first failure (with what was
seen). It creates one room per run and leaves it (rooms have no delete).
"""

import argparse
import asyncio
import json
import sys
import time
import urllib.parse

import websockets

from rest_call import rest_call

DEADLINE = 15.0


def step(message):
    print(f"smoke: {message}", flush=True)


def fail(message):
    print(f"smoke: FAILED: {message}", file=sys.stderr, flush=True)
    sys.exit(1)


def rest(base, method, path, token=None, body=None):
    try:
        return rest_call(base, method, path, token, body, timeout=DEADLINE)
    except OSError as err:
        fail(f"{method} {path}: {err}")


async def next_event(socket, kind, who):
    """The payload of the next event of type `kind` (others are skipped)."""
    end = time.monotonic() + DEADLINE
    while True:
        left = end - time.monotonic()
        if left <= 0:
            fail(f"{who}: no {kind} within {DEADLINE:.0f} s")
        try:
            raw = await asyncio.wait_for(socket.recv(), left)
        except asyncio.TimeoutError:
            fail(f"{who}: no {kind} within {DEADLINE:.0f} s")
        except websockets.ConnectionClosed as err:
            fail(f"{who}: the socket closed ({err.code} {err.reason!r}) waiting for {kind}")
        event = json.loads(raw)
        if event.get("type") == "error":
            fail(f"{who}: error event waiting for {kind}: {event}")
        if event.get("type") == kind:
            return event["payload"]


def ws_url(base, token):
    separator = "&" if "?" in base else "?"
    return f"{base}{separator}token={urllib.parse.quote(token)}"


async def run(args):
    status, body = rest(args.rest, "GET", "/health")
    if status != 200 or body.get("status") != "ok":
        fail(f"/health answered {status} {body}")
    step(f"health ok: {body}")

    tokens = [args.token, args.token2 or args.token]
    users = []
    for token in dict.fromkeys(tokens):
        status, body = rest(args.rest, "GET", "/api/v1/chat/rooms", token)
        if status != 200:
            fail(f"GET /rooms answered {status} {body}")
    async with websockets.connect(ws_url(args.ws, tokens[0]), open_timeout=DEADLINE) as a:
        connected = await next_event(a, "connected", "client A")
        users.append(connected["userId"])
        async with websockets.connect(ws_url(args.ws, tokens[1]), open_timeout=DEADLINE) as b:
            connected = await next_event(b, "connected", "client B")
            users.append(connected["userId"])
            step(f"two clients connected (users {', '.join(dict.fromkeys(users))}): the relay posts to them")

            others = [u for u in dict.fromkeys(users) if u != users[0]]
            status, body = rest(args.rest, "POST", "/api/v1/chat/rooms", tokens[0],
                                {"type": "GROUP", "name": "smoke test", "memberIds": others})
            if status != 201:
                fail(f"POST /rooms answered {status} {body}")
            room = body["room"]["id"]
            step(f"room {room} created")

            for socket, who in ((a, "client A"), (b, "client B")):
                await socket.send(json.dumps({"type": "joinRoom", "payload": {"roomId": room}}))
                await next_event(socket, "roomJoined", who)
            step("both joined")

            text = f"smoke {time.time():.3f}"
            await a.send(json.dumps({"type": "sendMessage",
                                     "payload": {"roomId": room, "content": text,
                                                 "clientMessageId": f"smoke-{time.time_ns()}"}}))
            sent = time.monotonic()
            for socket, who in ((a, "client A"), (b, "client B")):
                message = await next_event(socket, "message", who)
                if message.get("content") != text:
                    fail(f"{who} got {message}, not the message sent")
            step(f"message delivered to both through the relay in {1000 * (time.monotonic() - sent):.0f} ms"
                 f" (sequenceId {message['sequenceId']})")

            status, body = rest(args.rest, "GET", f"/api/v1/chat/rooms/{room}/messages", tokens[1])
            if status != 200 or not any(m.get("content") == text for m in body.get("messages", [])):
                fail(f"history does not have the message: {status} {body}")
            step("history has it")

            status, body = rest(args.rest, "GET", f"/api/v1/chat/rooms/{room}/online", tokens[0])
            online = body.get("onlineUsers", []) if isinstance(body, dict) else []
            if status != 200 or not all(u in online for u in users):
                fail(f"presence does not list {users}: {status} {body}")
            step(f"presence lists {', '.join(dict.fromkeys(users))}")
    step("passed")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ws", required=True, help="WebSocket URL (stack output WebSocketUrl)")
    parser.add_argument("--rest", required=True, help="REST base URL (stack output HttpApiUrl)")
    parser.add_argument("--token", required=True, help="a JWT the deployment accepts")
    parser.add_argument("--token2", help="another user's JWT (optional)")
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
