"""Clients that hold connections without sending a request, against a real
``maskrcnn serve``: slow or endless headers, a stalled body, oversized and
malformed requests. Each is closed by its deadline or refused at once, in the
error shape, and a normal client is served all the while."""

import json
import socket
import threading
import time

import pytest

from tests.app.conftest import running_server, timed_segment

pytestmark = pytest.mark.slow

LIMITS = {"header_timeout_s": 4, "body_timeout_s": 2, "max_header_kb": 8, "keep_alive_s": 1}


@pytest.fixture(scope="module")
def guarded(checkpoint, tmp_path_factory):
    with running_server(checkpoint, tmp_path_factory.mktemp("guarded"), **LIMITS) as server:
        server.wait_ready()
        yield server


def connect(server) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=30)
    return sock


def answer(sock: socket.socket) -> tuple[int, dict | None, float]:
    """Read until the server closes: the status, the JSON body, when it closed."""
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    closed_at = time.monotonic()
    head, _, body = data.partition(b"\r\n\r\n")
    status = int(head.split(b" ")[1]) if head else 0
    return status, json.loads(body) if body.startswith(b"{") else None, closed_at


def test_fifty_slow_header_connections_are_closed_and_stop_no_one(guarded):
    request = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 100
    socks = [connect(guarded) for _ in range(50)]
    started = time.monotonic()

    def trickle() -> None:  # a byte a second on each, until just before the deadline
        for byte in request:
            for sock in socks:
                sock.send(bytes([byte]))
            time.sleep(1)
            if time.monotonic() - started > LIMITS["header_timeout_s"] - 1.2:
                return  # what follows the server's close would only reset the socket

    sender = threading.Thread(target=trickle, daemon=True)
    sender.start()
    for _ in range(5):
        status, seconds = timed_segment(guarded.url)
        assert status == 200 and seconds < 5
    results = [answer(sock) for sock in socks]
    for status, body, closed_at in results:
        assert status == 408 and body["error"]["code"] == "request_timeout"
        assert closed_at - started < LIMITS["header_timeout_s"] + 3
    sender.join(10)


def test_a_connection_that_sends_nothing_is_closed_by_the_header_deadline(guarded):
    started = time.monotonic()
    status, body, closed_at = answer(connect(guarded))
    assert status == 408 and body["error"]["code"] == "request_timeout"
    assert LIMITS["header_timeout_s"] - 0.5 < closed_at - started < LIMITS["header_timeout_s"] + 3


def test_a_stalled_body_is_a_408_in_the_error_shape(guarded):
    sock = connect(guarded)
    sock.sendall(
        b"POST /v1/segment/json HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: 1000\r\n\r\n" + b'{"images": ['
    )
    started = time.monotonic()
    status, body, closed_at = answer(sock)
    assert status == 408 and body["error"]["code"] == "request_timeout"
    assert "BODY_TIMEOUT_S" in body["error"]["message"]
    assert closed_at - started < LIMITS["body_timeout_s"] + 3
    assert timed_segment(guarded.url)[0] == 200


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 100_000 + b"\r\n\r\n",
        b"GET /" + b"a" * 100_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
        b"POST /v1/segment HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n",
        b"POST /v1/segment HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999999999999999999\r\n\r\n",
    ],
    ids=["100 KB header", "100 KB URL", "negative length", "huge length"],
)
def test_oversized_and_malformed_requests_are_400s_in_the_error_shape(guarded, request_bytes):
    sock = connect(guarded)
    started = time.monotonic()
    sock.sendall(request_bytes)
    status, body, closed_at = answer(sock)
    assert status in (400, 413), status
    assert body is not None and body["error"]["code"] in ("bad_request", "payload_too_large")
    assert closed_at - started < 2
    assert timed_segment(guarded.url)[0] == 200


def test_an_idle_keep_alive_connection_is_closed(guarded):
    sock = connect(guarded)
    sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    first = b""
    while not first.endswith(b'{"status":"ok"}'):
        first += sock.recv(65536)
    assert first.startswith(b"HTTP/1.1 200")
    started = time.monotonic()
    assert sock.recv(65536) == b""  # closed by the server, not by us
    assert time.monotonic() - started < LIMITS["keep_alive_s"] + 2
