"""One REST call, JSON in and out, for the Python test scripts next to it
(smoke.py, lambda_local_test.py). Standard library only, so that it runs
wherever they do."""

import json
import urllib.error
import urllib.request


def rest_call(base, method, path, token=None, body=None, timeout=15.0):
    """`method` `base` + `path`, with `body` as JSON and `token` as the bearer
    token when given. Returns (status, reply): the reply decoded from JSON, or
    the text of an error reply that is not JSON. Raises OSError (URLError,
    timeouts) when no HTTP answer comes."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(base.rstrip("/") + path, data=data, method=method)
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    if data is not None:
        request.add_header("content-type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as reply:
            return reply.status, json.loads(reply.read() or b"null")
    except urllib.error.HTTPError as err:
        text = err.read().decode(errors="replace")
        try:
            return err.code, json.loads(text)
        except json.JSONDecodeError:
            return err.code, text
