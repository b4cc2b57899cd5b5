"""Traffic a careless or hostile client sends, against a real uvicorn (issue 11, items 3,
9 and 10): keys checked before a body byte is read, uploads held at once capped, slow
and stalled clients closed, connections bounded, protocol errors answered in JSON, and
only the health checks and the web page open when keys are set."""

from __future__ import annotations

import asyncio
import hashlib
import http.client
import json
import select
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import psutil
import pytest

from photos import jpeg
from server import Server

KEYS = ("first-key", "second-key")
BOUNDARY = "StallStallStall"
PREAMBLE = (f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"p.jpg\"\r\n"
            "Content-Type: image/jpeg\r\n\r\n").encode()
MB = 2**20


def request_head(declared: int | None, path: str = "/v1/parse", **headers: str) -> bytes:
    lines = [f"POST {path} HTTP/1.1", "Host: 127.0.0.1",
             f"Content-Type: multipart/form-data; boundary={BOUNDARY}"]
    lines.append(f"Content-Length: {declared}" if declared is not None else "Transfer-Encoding: chunked")
    lines += [f"{k.replace('_', '-')}: {v}" for k, v in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def read_response(sock: socket.socket, timeout: float) -> tuple[int, dict, bytes]:
    sock.settimeout(timeout)
    response = http.client.HTTPResponse(sock)
    response.begin()
    return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()


def assert_json_error(status: int, body: bytes, expected_status: int, code: str) -> dict:
    assert status == expected_status, (status, body)
    doc = json.loads(body)
    assert set(doc) == {"error"} and doc["error"]["code"] == code, doc
    return doc


def connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=10)


def closed_by_server(sock: socket.socket, deadline: float) -> bool:
    """True once the server has closed the connection (EOF or reset), reading and
    discarding whatever it sent before; False if it is still open at the deadline."""
    sock.setblocking(False)
    while time.monotonic() < deadline:
        readable, _, _ = select.select([sock], [], [], max(0.0, min(0.5, deadline - time.monotonic())))
        if not readable:
            continue
        try:
            if not sock.recv(65536):
                return True
        except BlockingIOError:
            continue
        except OSError:
            return True
    return False


class RssSampler(threading.Thread):
    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.process = psutil.Process(pid)
        self.peak = self.process.memory_info().rss
        self.stop = threading.Event()
        self.start()

    def run(self) -> None:
        while not self.stop.wait(0.05):
            self.peak = max(self.peak, self.process.memory_info().rss)

    def rss(self) -> int:
        return self.process.memory_info().rss


# -- item 10 and keys: who may read what ----------------------------------------------

@pytest.fixture(scope="module")
def keyed(tmp_path_factory):
    s = Server(tmp_path_factory.mktemp("keyed"), api_key=",".join(KEYS), max_upload_mb=20).wait_ready()
    yield s
    s.stop()


def test_every_configured_key_is_accepted(keyed):
    for key in KEYS:
        assert keyed.client.get("/v1/labels", headers={"X-API-Key": key}).status_code == 200
        assert keyed.client.get("/v1/labels", headers={"Authorization": f"Bearer {key}"}).status_code == 200
    r = keyed.client.get("/v1/labels", headers={"X-API-Key": "first-key,second-key"})
    assert_json_error(r.status_code, r.content, 401, "unauthorized")


def test_unauthenticated_body_is_never_read(keyed):
    """The 401 arrives while the client has sent only the request head of a 19 MB body."""
    with connect(keyed.port) as sock:
        sock.sendall(request_head(19 * MB))
        status, headers, body = read_response(sock, timeout=10)
        assert_json_error(status, body, 401, "unauthorized")
        assert headers.get("connection") == "close"
        assert closed_by_server(sock, time.monotonic() + 10)


def test_with_keys_only_health_and_the_page_are_open(keyed):
    for path in ("/healthz", "/readyz", "/", "/static/main.js"):
        assert keyed.client.get(path).status_code == 200, path
    for path in ("/metrics", "/docs", "/openapi.json", "/v1/model", "/v1/tasks/nope"):
        r = keyed.client.get(path)
        assert_json_error(r.status_code, r.content, 401, "unauthorized")
        assert keyed.client.get(path, headers={"X-API-Key": KEYS[1]}).status_code in (200, 404), path


def test_open_paths_are_a_setting(tmp_path):
    s = Server(tmp_path, api_key=KEYS[0], open_paths=["/readyz", "/metrics", "/docs", "/openapi.json"])
    try:
        s.wait_ready()
        for path in ("/metrics", "/docs", "/openapi.json"):
            assert s.client.get(path).status_code == 200, path
        for path in ("/healthz", "/", "/static/main.js", "/v1/model"):
            assert s.client.get(path).status_code == 401, path
    finally:
        s.stop()


def test_openapi_declares_the_key_schemes(keyed):
    spec = keyed.client.get("/openapi.json", headers={"X-API-Key": KEYS[0]}).json()
    schemes = spec["components"]["securitySchemes"]
    assert {s["type"] for s in schemes.values()} == {"http", "apiKey"}
    submit = spec["paths"]["/v1/parse"]["post"]
    assert {name for req in submit["security"] for name in req} == set(schemes)
    assert "401" in submit["responses"]
    assert "security" not in spec["paths"]["/healthz"]["get"]


# -- item 3: slow, partial and stalled uploads --------------------------------------

STALL = dict(max_upload_mb=20, max_uploads_mb=40, header_timeout_s=3, body_timeout_s=3,
             max_connections=1000)


@pytest.fixture(scope="module")
def stall_server(tmp_path_factory):
    s = Server(tmp_path_factory.mktemp("stall"), **STALL).wait_ready()
    yield s
    s.stop()


def stall_mid_body(port: int, declared: int | None, sent: int) -> socket.socket:
    """A client that declares a large body (or chunks one), sends `sent` bytes of it and
    stops; a server that answers and closes early may reset the send: fine."""
    sock = connect(port)
    data = PREAMBLE + b"\xff\xd8\xff\xe0" + b"\x5a" * sent
    try:
        sock.sendall(request_head(declared))
        if declared is None:
            sock.sendall(f"{len(data):x}\r\n".encode() + data + b"\r\n")
        else:
            sock.sendall(data)
    except OSError:
        pass
    return sock


def test_hundreds_of_stalled_uploads_stay_bounded_and_are_closed(stall_server):
    s = stall_server
    sampler = RssSampler(s.proc.pid)
    # one parse of the photo sent below, alone: the stalls are measured beyond its peak
    assert s.submit(jpeg(80, 60, seed=1), wait=30).status_code == 200
    parse_peak, baseline = sampler.peak, sampler.rss()
    t0 = time.monotonic()
    with ThreadPoolExecutor(16) as pool:
        # 400 declare 19 MB and send 1 MB; 20 send a chunked MB without declaring a size
        sockets = list(pool.map(lambda i: stall_mid_body(s.port, 19 * MB if i < 400 else None, MB),
                                range(420)))
    stalled_at = time.monotonic()
    try:
        # others are served meanwhile: a photo is parsed while the stalled bodies hang.
        # After a second, once the server has taken in what was sent: with the parse
        # running while the 420 first megabytes still arrive, the growth measured was
        # 62-82 MB in most runs but 123-127 MB in 2 of ~12 (the parse's working memory
        # stacked on buffers being filled), 62-69 MB in 4 of 4 with the pause
        time.sleep(1)
        r = s.submit(jpeg(80, 60, seed=2), wait=30)
        assert r.status_code == 200 and r.json()["status"] == "succeeded", r.text
        assert s.client.get("/readyz").status_code == 200
        # every stalled connection is closed: refused at once or after the body timeout
        deadline = stalled_at + STALL["body_timeout_s"] + 30
        still_open = [sock for sock in sockets if not closed_by_server(sock, deadline)]
        assert not still_open, f"{len(still_open)} stalled connections still open"
        closed_after = time.monotonic() - t0
    finally:
        for sock in sockets:
            sock.close()
    time.sleep(2)
    sampler.stop.set()
    growth, after = sampler.peak - max(parse_peak, baseline), sampler.rss() - baseline
    # 420 MB were sent (the server held 520 MB more before it had limits); it may hold
    # 40 MB of bodies plus buffers of the connections they arrive on
    assert growth < 120 * MB, f"RSS grew {growth / MB:.0f} MB"
    assert after < 50 * MB, f"RSS still {after / MB:.0f} MB over the baseline ({closed_after:.0f} s)"
    assert s.submit(jpeg(80, 60, seed=3), wait=30).status_code == 200


def test_uploads_over_the_budget_get_503_and_stalled_ones_give_way(tmp_path):
    s = Server(tmp_path, max_upload_mb=20, max_uploads_mb=20, body_timeout_s=60).wait_ready()
    # one client sends all but the last KB of a 20 MB body and stops: the budget is full
    holder = stall_mid_body(s.port, 20 * MB, 20 * MB - len(PREAMBLE) - 4 - 1024)
    try:
        time.sleep(1)  # the server has read what was sent (it holds it), and waits for more
        with connect(s.port) as sock:
            sock.sendall(request_head(5 * MB))
            status, headers, body = read_response(sock, timeout=10)
            assert_json_error(status, body, 503, "uploads_busy")
            assert 1 <= int(headers["retry-after"]) <= 30
        # once the holder has kept the server waiting a while, it gives its room up
        time.sleep(2.5)
        r = s.submit(jpeg(64, 48, seed=4) + b"\0" * (5 * MB))  # trailing bytes after the JPEG's end
        assert r.status_code in (200, 202), r.text
        assert select.select([holder], [], [], 10)[0], "the stalled holder did not give its room up"
        status, _, body = read_response(holder, timeout=5)
        assert_json_error(status, body, 408, "request_timeout")
    finally:
        holder.close()
        s.stop()


def test_slow_clients_are_closed_after_the_timeouts(stall_server):
    """Trickling keeps no connection open: the head has a deadline, and the body must keep
    a minimum pace once its grace is over; the server answers 408 and closes."""
    port = stall_server.port
    head = connect(port)
    head.sendall(b"POST /v1/parse HTTP/1.1\r\nHost: x\r\n")
    idle = connect(port)  # never sends a byte: closed without an answer
    body = connect(port)
    body.sendall(request_head(64 * 1024) + PREAMBLE)
    t0 = time.monotonic()
    answers: dict[str, tuple[int, bytes]] = {}
    try:
        while time.monotonic() - t0 < 20 and len(answers) < 2:
            for name, sock in (("head", head), ("body", body)):
                if name in answers:
                    continue
                try:
                    sock.sendall(b"X-Slow: 1\r\n" if name == "head" else b"z" * 16)
                except OSError:
                    pass
                readable, _, _ = select.select([sock], [], [], 0)
                if readable:
                    status, _, data = read_response(sock, timeout=5)
                    answers[name] = (status, data)
            time.sleep(0.5)
        elapsed = time.monotonic() - t0
        assert set(answers) == {"head", "body"}, f"still open after {elapsed:.0f} s"
        for status, data in answers.values():
            assert_json_error(status, data, 408, "request_timeout")
        assert elapsed < 15
        assert closed_by_server(idle, time.monotonic() + 10)
    finally:
        for sock in (head, idle, body):
            sock.close()


def test_connections_past_the_limit_get_a_json_503(tmp_path):
    s = Server(tmp_path, max_connections=20).wait_ready()
    held = []
    try:
        for _ in range(25):  # keep-alive connections, each served once and left open
            sock = connect(s.port)
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            held.append((sock, read_response(sock, timeout=10)))
        statuses = [status for _, (status, _, _) in held]
        served = statuses.count(200)  # the test client's own keep-alive connection counts too
        assert 18 <= served <= 20 and statuses == [200] * served + [503] * (25 - served), statuses
        status, headers, body = held[-1][1]
        assert_json_error(status, body, 503, "too_many_connections")
        assert "retry-after" in headers
        # once they have idled a while, the idlest is closed to let a newcomer in
        time.sleep(3)
        with connect(s.port) as sock:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            assert read_response(sock, timeout=10)[0] == 200
        idle = [sock for sock, (status, _, _) in held if status == 200]
        assert any(closed_by_server(sock, time.monotonic() + 2) for sock in idle)
    finally:
        for sock, _ in held:
            sock.close()
        s.stop()


# -- item 9: errors the server itself answers -----------------------------------------

@pytest.mark.parametrize("raw, status, code", [
    (b"GET /\x00\x01 HTTP/1.1\r\nHost: x\r\n\r\n", 400, "bad_request"),
    (b"\xff\xfe GARBAGE\r\n\r\n", 400, "bad_request"),
    (b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (70 * 1024) + b"\r\n\r\n", 431, "headers_too_large"),
])
def test_protocol_errors_are_json(stall_server, raw, status, code):
    with connect(stall_server.port) as sock:
        sock.sendall(raw)
        got, headers, body = read_response(sock, timeout=10)
    assert headers["content-type"] == "application/json"
    assert_json_error(got, body, status, code)


# -- the caller's identity, for routes ------------------------------------------------

def test_the_caller_is_recorded_as_a_digest_of_its_key():
    from m2fp_api.api.auth import ApiKeys, Authenticate, OpenPaths

    async def echo_owner(scope, receive, send):
        body = json.dumps(scope["state"]["owner"]).encode()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": body})

    open_paths = OpenPaths.parse(["/open", "/static/*"])

    async def owners(keys: str | None, *requests: tuple[str, dict]) -> list:
        app = Authenticate(echo_owner, ApiKeys.parse(keys), open_paths)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://t") as client:
            responses = [await client.get(path, headers=headers) for path, headers in requests]
        return [r.json() if r.status_code == 200 else r.status_code for r in responses]

    got = asyncio.run(owners(" a-key, b-key ,", ("/v1/x", {"X-API-Key": "a-key"}),
                             ("/v1/x", {"Authorization": "Bearer b-key"}), ("/open", {}),
                             ("/static/a/b.js", {}), ("/openx", {}), ("/v1/x", {})))
    assert got[0] == hashlib.sha256(b"a-key").hexdigest()[:16] and got[1] not in (None, got[0])
    assert got[2:] == [None, None, 401, 401]
    assert asyncio.run(owners(None, ("/v1/x", {"X-API-Key": "a-key"}))) == [None]
