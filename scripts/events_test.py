#!/usr/bin/env python3
"""Drives every sample event in events/ through its real function binary.

`cargo lambda watch` emulates the Lambda Runtime API and runs the function
binaries (`cargo run --bin <function>`), exactly as they run in Lambda;
`cargo lambda invoke --data-file` sends each event, and this script checks
each response: status code and the fields that matter. Run it through
scripts/test-events.sh, which finds PostgreSQL and Redis, puts cargo-lambda
on PATH and builds the binaries first.

The run gets its own database (chat_test_events_*), Redis key prefix and
JWT secret, and a stub Management API on 127.0.0.1: the $connect events'
domainName is pointed at it, so the maintenance job's DeleteConnection calls
for swept connections land there and are checked too. The events' tokens
come from scripts/mint-events.sh; room ids from earlier responses.

Environment: DATABASE_URL (a server where databases may be created),
REDIS_URL, CARGO_TARGET_DIR; EVENTS_TEST_KEEP=1 keeps the temp dir.
"""

import http.server
import json
import os
import queue
import random
import shutil
import signal
import socket
import string
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRESENCE_TTL = 4  # seconds; short, so the maintenance step has a lease to sweep
INVOKE_TIMEOUT = 180  # a first invoke may still build the binary


def rand(n=10):
    return "".join(random.choice(string.ascii_lowercase) for _ in range(n))


def log(msg):
    print(msg, flush=True)


class Failure(Exception):
    pass


def expect(cond, what):
    if not cond:
        raise Failure(what)


# ---------------------------------------------------------------- stub Management API


class Management(http.server.BaseHTTPRequestHandler):
    """Records @connections calls; answers like API Gateway for live ids."""

    calls = []

    def _record(self, status):
        length = int(self.headers.get("content-length") or 0)
        if length:
            self.rfile.read(length)
        Management.calls.append((self.command, urllib.parse.unquote(self.path)))
        self.send_response(status)
        self.send_header("content-length", "0")
        self.end_headers()

    def do_DELETE(self):  # noqa: N802 (http.server naming)
        self._record(204)

    def do_POST(self):  # noqa: N802
        self._record(200)

    def log_message(self, *args):
        pass


# ---------------------------------------------------------------- services


def psql(url, sql):
    subprocess.run(["psql", url, "-X", "-q", "-v", "ON_ERROR_STOP=1", "-c", sql],
                   check=True, stdout=subprocess.DEVNULL)


def with_db(url, db):
    parts = urllib.parse.urlsplit(url)
    return urllib.parse.urlunsplit(parts._replace(path="/" + db))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port, proc, log_path, seconds=60):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise Failure(f"cargo lambda watch exited early:\n{tail(log_path)}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.1)
    raise Failure(f"cargo lambda watch did not listen on {port}:\n{tail(log_path)}")


def tail(path, lines=40):
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-lines:])
    except OSError:
        return "(no log)"


# ---------------------------------------------------------------- checks


def body_json(resp):
    body = resp.get("body")
    expect(body, f"a JSON body, got {resp!r}")
    return json.loads(body)


def status(resp, code):
    expect(resp.get("statusCode") == code, f"status {code}, got {resp!r}")


def no_body(resp):
    status(resp, 200)
    expect(not resp.get("body"), f"no reply body, got {resp.get('body')!r}")


class BusTap:
    """The bus channels as the relay reads them: every partition's,
    `<channel>:{p<n>}` (`redis-cli PSUBSCRIBE`; a single Redis's bus is
    plain pub/sub)."""

    def __init__(self, redis_url, channel):
        self.proc = subprocess.Popen(["redis-cli", "-u", redis_url, "PSUBSCRIBE", channel + ":{p*}"],
                                     stdout=subprocess.PIPE, text=True)
        self.lines = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        # "psubscribe", the pattern, the count: subscribed.
        for _ in range(3):
            self.lines.get(timeout=10)

    def _read(self):
        for line in self.proc.stdout:
            self.lines.put(line.strip())

    def joined(self, timeout=10):
        """The next Control::Joined envelope on the bus."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise Failure("no Control::Joined envelope on the bus within 10 s")
            if line.startswith("{"):
                envelope = json.loads(line)
                if (envelope.get("control") or {}).get("type") == "joined":
                    return envelope

    def close(self):
        self.proc.terminate()
        self.proc.wait()


def main():
    tmp = tempfile.mkdtemp(prefix="chat-events-")
    admin_url = os.environ["DATABASE_URL"]
    redis_url = os.environ["REDIS_URL"]
    target = os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target"))
    chat_local = os.path.join(target, "debug", "chat-local")
    db = f"chat_test_events_{rand()}"
    prefix = f"events:{rand()}:"
    env = dict(
        os.environ,
        DATABASE_URL=with_db(admin_url, db),
        REDIS_URL=redis_url,
        REDIS_KEY_PREFIX=prefix,
        BROADCAST_CHANNEL=f"{prefix}broadcast",
        JWT_SECRET=f"events-{rand(24)}",
        PRESENCE_TTL_SECONDS=str(PRESENCE_TTL),
        MESSAGE_RETENTION="100",
        PG_POOL_MAX="2",
        # The maintenance function closes swept connections only at allowed
        # Management API endpoints: here, the stub on this machine.
        RELAY_ALLOWED_ENDPOINTS="http://127.0.0.1:*/prod",
        RUST_LOG="warn",
        # A start-up error is then its message, not pages of backtrace.
        RUST_BACKTRACE="0",
        RUST_LIB_BACKTRACE="0",
    )
    for var in ("JWT_ISSUER", "JWT_AUDIENCE"):
        env.pop(var, None)

    stub = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Management)
    threading.Thread(target=stub.serve_forever, daemon=True).start()
    stub_host = f"127.0.0.1:{stub.server_address[1]}"

    watch = None
    watch_log = os.path.join(tmp, "watch.log")  # outside the repository: no rebuild loops
    ok = False
    try:
        psql(admin_url, f"CREATE DATABASE {db}")
        subprocess.run([chat_local, "migrate"], env=env, check=True, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)

        minted = os.path.join(tmp, "minted")
        subprocess.run([os.path.join(ROOT, "scripts", "mint-events.sh"), minted],
                       env=dict(env, CHAT_LOCAL=chat_local), check=True)

        port = free_port()
        with open(watch_log, "w") as out:
            watch = subprocess.Popen(
                ["cargo", "lambda", "watch", "--ignore-changes",
                 "--invoke-address", "127.0.0.1", "--invoke-port", str(port)],
                cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        wait_for_port(port, watch, watch_log)

        ids = {}
        run = Runner(minted, tmp, port, ids, stub_host, watch_log)
        steps(run, ids, redis_url, env["BROADCAST_CHANNEL"])
        ok = True
        log(f"events: all {run.count} invocations passed "
            f"({len(run.files)} event files, every one in events/)")
        missing = run.all_files() - run.files
        expect(not missing, f"events not exercised: {sorted(missing)}")
    except Failure as err:
        log(f"\nevents: FAILED: {err}\n--- cargo lambda watch log (tail) ---\n{tail(watch_log)}")
    except subprocess.CalledProcessError as err:
        log(f"\nevents: FAILED: {err}")
    finally:
        if watch is not None and watch.poll() is None:
            os.killpg(watch.pid, signal.SIGTERM)
            try:
                watch.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(watch.pid, signal.SIGKILL)
        stub.shutdown()
        try:
            psql(admin_url, f"DROP DATABASE IF EXISTS {db} WITH (FORCE)")
        except subprocess.CalledProcessError:
            log(f"events: could not drop {db}; scripts/test.sh drops leftovers later")
        keys = subprocess.run(["redis-cli", "-u", redis_url, "--scan", "--pattern", prefix + "*"],
                              capture_output=True, text=True).stdout.split()
        for i in range(0, len(keys), 500):
            subprocess.run(["redis-cli", "-u", redis_url, "DEL", *keys[i:i + 500]],
                           stdout=subprocess.DEVNULL)
        if os.environ.get("EVENTS_TEST_KEEP") == "1":
            log(f"events: kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    return 0 if ok else 1


class Runner:
    """Invokes one event file with `cargo lambda invoke` and returns the response."""

    def __init__(self, minted, tmp, port, ids, stub_host, watch_log):
        self.minted, self.tmp, self.port, self.ids = minted, tmp, port, ids
        self.stub_host, self.watch_log = stub_host, watch_log
        self.files, self.count = set(), 0

    def all_files(self):
        base = os.path.join(ROOT, "events")
        return {os.path.relpath(os.path.join(d, f), base)
                for d, _, fs in os.walk(base) for f in fs if f.endswith(".json")}

    def invoke(self, rel, function, data):
        """Runs `cargo lambda invoke`. A function that fails to build or to
        start leaves the invoke waiting, so the watch log is read meanwhile
        and such a failure ends the wait at once."""
        offset = os.path.getsize(self.watch_log)
        out, err = os.path.join(self.tmp, "invoke.out"), os.path.join(self.tmp, "invoke.err")
        with open(out, "w") as o, open(err, "w") as e:
            proc = subprocess.Popen(
                ["cargo", "lambda", "invoke", "--invoke-address", "127.0.0.1",
                 "--invoke-port", str(self.port), "--data-file", data, function],
                cwd=self.tmp, stdout=o, stderr=e)
            deadline = time.monotonic() + INVOKE_TIMEOUT
            while proc.poll() is None:
                with open(self.watch_log, errors="replace") as f:
                    f.seek(offset)
                    new = f.read()
                if "ERROR command exited" in new or "error: could not compile" in new:
                    proc.kill()
                    raise Failure(f"{rel}: {function} failed to build or start:\n{new[-3000:]}")
                if time.monotonic() > deadline:
                    proc.kill()
                    raise Failure(f"{rel}: no response in {INVOKE_TIMEOUT} s")
                time.sleep(0.05)
        with open(out) as o, open(err) as e:
            return o.read(), e.read(), proc.returncode

    def __call__(self, rel, check):
        function = rel.split("/")[0]
        with open(os.path.join(self.minted, rel)) as f:
            text = f.read()
        for placeholder, key in (("__ROOM_ID__", "room"), ("__GROUP_ID__", "group")):
            if placeholder in text:
                expect(key in self.ids, f"{rel} needs the {key} id from an earlier step")
                text = text.replace(placeholder, self.ids[key])
        event = json.loads(text)
        if function == "ws-connect":
            # The callback endpoint is built from domainName: point it at the stub.
            event["requestContext"]["domainName"] = self.stub_host
            event["headers"]["Host"] = self.stub_host
            event["multiValueHeaders"]["Host"] = [self.stub_host]
        data = os.path.join(self.tmp, "invoke.json")
        with open(data, "w") as f:
            json.dump(event, f)
        started = time.monotonic()
        stdout, stderr, code = self.invoke(rel, function, data)
        if code != 0:
            raise Failure(f"{rel}: cargo lambda invoke failed:\n{stdout}{stderr}")
        try:
            resp = json.loads(stdout)
        except json.JSONDecodeError:
            raise Failure(f"{rel}: response is not JSON: {stdout!r}")
        try:
            result = check(resp)
        except Failure as err:
            raise Failure(f"{rel} ({function}): {err}")
        except (KeyError, TypeError, ValueError, IndexError) as err:
            raise Failure(f"{rel} ({function}): unexpected response shape ({err!r}): {resp!r}")
        ms = (time.monotonic() - started) * 1000
        self.files.add(rel)
        self.count += 1
        code = resp.get("statusCode", "-")
        log(f"  ok  {function:<14} {rel:<44} {code!s:>4} {ms:6.0f} ms")
        return result


def steps(run, ids, redis_url, channel):
    """The scenario: alice and bob connect, alice talks over the WebSocket,
    both use REST, alice leaves, bob's lease runs out and is swept."""

    def health(r):
        status(r, 200)
        expect(body_json(r) == {"status": "ok", "postgres": "ok", "redis": "ok"}, r["body"])

    run("rest/health.json", health)

    def openapi(r):
        status(r, 200)
        doc = body_json(r)
        expect(doc["openapi"].startswith("3.") and "/api/v1/chat/rooms" in doc["paths"], list(doc))

    run("rest/openapi.json", openapi)

    run("ws-connect/connect.json", lambda r: status(r, 200))
    run("ws-connect/connect-authorization-header.json", lambda r: status(r, 200))
    bob_connected = time.monotonic()

    def refused(r):
        status(r, 401)
        expect(body_json(r)["error"]["code"] == "UNAUTHORIZED", r["body"])

    run("ws-connect/connect-bad-token.json", refused)

    # A join answers nothing on the route either: its roomJoined goes out
    # on the bus, for the relay to post before any other event of the room.
    bus = BusTap(redis_url, channel)

    def joined(r):
        no_body(r)
        envelope = bus.joined()
        expect(envelope["control"]["connectionId"] == "WvX3bc0OjoECFhw=", envelope)
        event = envelope["event"]
        expect(event["type"] == "roomJoined", event)
        room = event["payload"]["room"]
        expect(room["type"] == "DIRECT" and room["id"].startswith("room_"), room)
        expect(event["payload"]["messages"] == [], event)
        expect(sorted(event["payload"]["onlineUsers"]) == ["alice", "bob"], event)
        ids["room"] = room["id"]

    run("ws-message/join-room.json", joined)
    bus.close()
    # sendMessage, typing and markRead answer nothing on the route: the
    # acknowledgement and the broadcasts go through the bus and the relay.
    run("ws-message/send-message.json", no_body)
    run("ws-message/typing.json", no_body)
    run("ws-message/mark-read.json", no_body)

    def pong(r):
        status(r, 200)
        event = body_json(r)
        expect(event["type"] == "pong" and event["payload"]["timestamp"].endswith("Z"), event)

    run("ws-message/ping.json", pong)

    def bad_request(r):
        status(r, 200)
        event = body_json(r)
        expect(event["type"] == "error", event)
        p = event["payload"]
        expect(p["code"] == "BAD_REQUEST" and p["requestType"] == "sendMessage"
               and p["clientMessageId"] == "a-0002", event)

    run("ws-message/bad-request.json", bad_request)

    def left(r):
        status(r, 200)
        expect(body_json(r) == {"type": "roomLeft", "payload": {"roomId": ids["room"]}}, r["body"])

    run("ws-message/leave-room.json", left)

    def rooms(r):
        status(r, 200)
        b = body_json(r)
        expect(b["count"] == 1 and b["rooms"][0]["id"] == ids["room"], b)
        expect(b["rooms"][0]["lastMessageText"] == "Hi Bob! Sent through the $default route.", b)

    run("rest/list-rooms.json", rooms)

    def history(r):
        status(r, 200)
        b = body_json(r)
        expect(b["count"] == 1 and b["hasMore"] is False, b)
        m = b["messages"][0]
        expect(m["sequenceId"] == 1 and m["senderId"] == "alice" and m["clientMessageId"] == "a-0001", m)

    run("rest/list-messages.json", history)

    def sent(r):
        status(r, 201)
        m = body_json(r)["message"]
        expect(m["sequenceId"] == 2 and m["content"] == "And one over REST.", m)

    run("rest/send-message.json", sent)

    def unread(r):
        status(r, 200)
        expect(body_json(r) == {"roomId": ids["room"], "unreadCount": 2}, r["body"])

    run("rest/unread.json", unread)

    def marked(r):
        status(r, 200)
        expect(body_json(r) == {"success": True, "roomId": ids["room"], "markedUpTo": 2}, r["body"])

    run("rest/mark-read.json", marked)

    def online(expected):
        def check(r):
            status(r, 200)
            b = body_json(r)
            expect(b["roomId"] == ids["room"] and sorted(b["onlineUsers"]) == expected
                   and b["count"] == len(expected), b)
        return check

    run("rest/online.json", online(["alice", "bob"]))

    def direct(r):
        status(r, 200)
        b = body_json(r)
        expect(b["room"]["id"] == ids["room"] and len(b["messages"]) == 2 and b["unreadCount"] == 0, b)

    run("rest/direct.json", direct)

    def created(r):
        status(r, 201)
        room = body_json(r)["room"]
        expect(room["type"] == "GROUP" and room["name"] == "Weekend trip", room)
        expect(sorted(m["id"] for m in room["members"]) == ["alice", "bob"], room)
        ids["group"] = room["id"]

    run("rest/create-room.json", created)

    def removed(r):
        status(r, 204)

    run("rest/remove-member.json", removed)

    def added(r):
        status(r, 200)
        room = body_json(r)["room"]
        expect(room["id"] == ids["group"], room)
        expect(sorted(m["id"] for m in room["members"]) == ["alice", "bob"], room)

    run("rest/add-members.json", added)

    def cleaned(r):
        status(r, 200)
        expect(body_json(r) == {"roomId": ids["room"], "deleted": 0, "kept": 2}, r["body"])

    run("rest/cleanup.json", cleaned)

    run("ws-disconnect/disconnect.json", lambda r: status(r, 200))

    # bob never sent a frame: once his lease has run out, the job sweeps him.
    time.sleep(max(0.0, PRESENCE_TTL + 0.5 - (time.monotonic() - bob_connected)))
    Management.calls.clear()

    def maintained(r):
        expect(r == {"sweptConnections": 1, "closedConnections": 1, "closeFailures": 0,
                     "deletedMessages": 0, "retention": 100}, r)
        expect(Management.calls == [("DELETE", "/prod/@connections/WvX4Ce1RjoECJ5Q=")],
               f"DeleteConnection for bob's connection, got {Management.calls}")

    run("maintenance/scheduled.json", maintained)
    run("rest/online.json", online([]))


if __name__ == "__main__":
    sys.exit(main())
