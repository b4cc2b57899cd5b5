"""`make loadtest`: many concurrent clients against a real service with the full-size
random checkpoint, alongside an abusive load: connections that stall mid-body or
mid-head, and uploads that crawl. Reports how many normal clients were served and
checks that every normal request was answered (accepted, or told when to retry), that
the inference slot was kept busy throughout (the abuse did not starve it of work), that
nothing accepted is lost, that nothing but capacity refusals is a 5xx, that every
abusive connection is closed by the server within its timeouts, and that the process
stays under its memory ceiling. Not part of `make test` (minutes; `--quick` for a
30-second run).

usage: python scripts/loadtest.py [--clients 32] [--seconds 120] [--stallers 300] [--slow 8] [--quick]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import selectors
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

import httpx
import numpy as np
import psutil
from PIL import Image

from m2fp_api.bench import BENCH_SEED
from m2fp_api.engine.stand_in import BENCH_CONFIG, ensure_stand_in
from m2fp_api.settings import Settings

SIZES = [(640, 480), (1280, 720), (1920, 1080), (2592, 1944), (4000, 3000)]
# answers that mean "busy, come back later", not a failure; the last two are what an
# abusive load may cost normal clients (reported)
CAPACITY_CODES = {"queue_full", "uploads_busy", "too_many_connections"}
ABUSE_CODES = {"uploads_busy", "too_many_connections"}
MB = 2**20
BOUNDARY = "LoadTestBoundary"
# slow uploads: one pace the service must accept, one under its minimum it must cut off
PACES = {"slow": 160 * 1024, "trickle": 2 * 1024}
STALL_KINDS = ("declared", "chunked", "head")


def photo(width: int, height: int, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    phase = rng.uniform(0, 6.28, 3)
    arr = np.stack([127 + 120 * np.sin(x / (37 + 9 * i) + y / 53 + phase[i]) for i in range(3)], -1)
    buf = io.BytesIO()
    Image.fromarray(arr.astype(np.uint8)).save(buf, format="JPEG", quality=88)
    return buf.getvalue()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def multipart(data: bytes, alpha: float) -> bytes:
    return (f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"overlay_alpha\"\r\n\r\n{alpha}\r\n"
            f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"p.jpg\"\r\n"
            f"Content-Type: image/jpeg\r\n\r\n").encode() + data + f"\r\n--{BOUNDARY}--\r\n".encode()


def head(declared: int | None) -> bytes:
    length = f"Content-Length: {declared}" if declared is not None else "Transfer-Encoding: chunked"
    return (f"POST /v1/parse HTTP/1.1\r\nHost: loadtest\r\n"
            f"Content-Type: multipart/form-data; boundary={BOUNDARY}\r\n{length}\r\n\r\n").encode()


def status_of(data: bytes) -> str:
    """The status and error code of a raw HTTP answer, e.g. `503:uploads_busy`."""
    if not data.startswith(b"HTTP/1.1 "):
        return "none"
    status = data[9:12].decode()
    try:
        code = json.loads(data.split(b"\r\n\r\n", 1)[1])["error"]["code"]
    except (IndexError, ValueError, KeyError, TypeError):
        return status
    return f"{status}:{code}"


@dataclass
class Tally:
    """What one kind of client saw; shared by threads under `lock`."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    outcomes: Counter = field(default_factory=Counter)
    accepted: list[str] = field(default_factory=list)
    served_clients: set[int] = field(default_factory=set)
    longest_open_s: float = 0.0

    def add(self, outcome: str, task_id: str | None = None, client: int | None = None,
            open_s: float = 0.0) -> None:
        with self.lock:
            self.outcomes[outcome] += 1
            self.longest_open_s = max(self.longest_open_s, open_s)
            if task_id:
                self.accepted.append(task_id)
                self.served_clients.add(client)


def normal_client(n: int, url: str, photos: dict, stop_at: float, tally: Tally) -> None:
    rng = random.Random(n)
    with httpx.Client(base_url=url, timeout=60) as c:
        while time.monotonic() < stop_at:
            data = rng.choice(photos[rng.choice(SIZES)])
            # vary the options so that de-duplication does not answer everything
            alpha = round(rng.uniform(0.2, 0.8), 3)
            try:
                r = c.post("/v1/parse", files={"file": ("p.jpg", data, "image/jpeg")},
                           data={"overlay_alpha": str(alpha)})
            except httpx.TransportError as exc:
                tally.add(f"transport:{type(exc).__name__}")
                time.sleep(1)
                continue
            code = r.json().get("error", {}).get("code") if r.status_code >= 400 else None
            accepted = r.status_code in (200, 202)
            tally.add(f"{r.status_code}{':' + code if code else ''}", r.json()["id"] if accepted else None, n)
            if r.status_code == 503:
                time.sleep(min(float(r.headers.get("retry-after", "1")), 10))


def slow_client(n: int, port: int, pace: int, photos: dict, stop_at: float, tally: Tally) -> None:
    """Sends a real photo (84-450 KB) at `pace` bytes a second, in quarter-second steps."""
    rng = random.Random(1000 + n)
    while time.monotonic() < stop_at:
        body = multipart(rng.choice(photos[rng.choice(SIZES[1:4])]), round(rng.uniform(0.2, 0.8), 3))
        t0 = time.monotonic()
        answer = b""
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
                try:
                    sock.sendall(head(len(body)))
                    step = max(1, pace // 4)
                    for i in range(0, len(body), step):
                        sock.sendall(body[i:i + step])
                        time.sleep(0.25)
                        if select_readable(sock):
                            break  # answered (and closed) before the whole body was sent
                except OSError:
                    pass  # the answer, if any, is already waiting to be read
                answer = read_answer(sock)
        except OSError:
            pass
        outcome = status_of(answer)
        task_id = None
        if outcome in ("200", "202"):
            task_id = json.loads(answer.split(b"\r\n\r\n", 1)[1])["id"]
        tally.add(outcome, task_id, n, time.monotonic() - t0)
        if outcome.startswith("503"):
            time.sleep(2)


def select_readable(sock: socket.socket) -> bool:
    sel = selectors.DefaultSelector()
    sel.register(sock, selectors.EVENT_READ)
    try:
        return bool(sel.select(0))
    finally:
        sel.close()


def read_answer(sock: socket.socket) -> bytes:
    """Reads one answer: up to its declared length, or to the connection's end."""
    data = b""
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            return data
        data += chunk
        header, sep, body = data.partition(b"\r\n\r\n")
        if sep:
            for line in header.split(b"\r\n"):
                if line.lower().startswith(b"content-length:") and len(body) >= int(line.split(b":")[1]):
                    return data


def stallers(count: int, port: int, stop_at: float, tally: Tally) -> None:
    """Keeps `count` connections that stall: mid-body after declaring 19 MB and sending
    1 MB, mid-body after a chunked MB, or mid-head. Each is replaced a second after the
    server closes it; how long each stayed open is recorded."""
    sel = selectors.DefaultSelector()
    opened: dict[socket.socket, tuple[str, float, bytearray]] = {}
    reopen_at: list[tuple[float, str]] = [(time.monotonic() + i * 0.01, STALL_KINDS[i % 3]) for i in range(count)]
    # the start of a well-formed upload, so the server reads it as one until it stops
    filler = multipart(b"\xff\xd8\xff\xe0" + b"\x5a" * MB, 0.5).rsplit(b"\r\n--", 1)[0]
    while time.monotonic() < stop_at:
        now = time.monotonic()
        due = [r for r in reopen_at if r[0] <= now]
        reopen_at = [r for r in reopen_at if r[0] > now]
        for _, kind in due:
            try:
                sock = socket.create_connection(("127.0.0.1", port), timeout=5)
                if kind == "declared":
                    sock.sendall(head(19 * MB) + filler)
                elif kind == "chunked":
                    sock.sendall(head(None) + f"{len(filler):x}\r\n".encode() + filler + b"\r\n")
                else:
                    sock.sendall(b"POST /v1/parse HTTP/1.1\r\nHost: loadtest\r\nContent-Ty")
            except OSError:
                tally.add(f"{kind}:reset")
                reopen_at.append((time.monotonic() + 1, kind))
                continue
            sock.setblocking(False)
            sel.register(sock, selectors.EVENT_READ)
            opened[sock] = (kind, time.monotonic(), bytearray())
        for key, _ in sel.select(0.2):
            sock = key.fileobj
            kind, t0, seen = opened[sock]
            try:
                chunk = sock.recv(65536)
            except BlockingIOError:
                continue
            except OSError:
                chunk = b""
            if chunk:
                seen += chunk
                continue
            sel.unregister(sock)
            sock.close()
            del opened[sock]
            tally.add(f"{kind}:{status_of(bytes(seen))}", open_s=time.monotonic() - t0)
            reopen_at.append((time.monotonic() + 1, kind))
    for sock, (kind, t0, _) in opened.items():
        tally.add(f"{kind}:open at the end", open_s=time.monotonic() - t0)
        sock.close()
    sel.close()


def slot_use(url: str, start_at: float, stop_at: float, samples: Counter) -> None:
    """Samples /metrics twice a second: was a task running?"""
    with httpx.Client(base_url=url, timeout=5) as c:
        while time.monotonic() < stop_at:
            time.sleep(0.5)
            if time.monotonic() < start_at:
                continue  # the queue fills up first
            try:
                text = c.get("/metrics").text
            except httpx.TransportError:
                samples["unknown"] += 1
                continue
            running = next((float(line.split()[1]) for line in text.splitlines()
                            if line.startswith("m2fp_in_flight ")), 0.0)
            samples["busy" if running > 0 else "idle"] += 1


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--clients", type=int, default=32, help="normal clients")
    ap.add_argument("--seconds", type=float, default=120)
    ap.add_argument("--stallers", type=int, default=300, help="connections kept stalled mid-body or mid-head")
    ap.add_argument("--slow", type=int, default=8, help="slow uploaders (half of them under the minimum pace)")
    ap.add_argument("--settle", type=float, default=900, help="max wait for accepted tasks after the load")
    ap.add_argument("--quick", action="store_true", help="30 s, 8 clients, 100 stallers, 4 slow uploaders")
    args = ap.parse_args()
    if args.quick:
        args.seconds, args.clients, args.stallers, args.slow = 30, 8, 100, 4

    settings = Settings()
    model_dir = ensure_stand_in(BENCH_CONFIG, settings.cache_dir, BENCH_SEED)
    port = free_port()
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("M2FP_")},
           "M2FP_MODEL": str(model_dir), "M2FP_PORT": str(port), "M2FP_LOG_LEVEL": "WARNING",
           "M2FP_QUEUE_TIMEOUT_S": "900", "M2FP_RUN_TIMEOUT_S": "600"}
    log = tempfile.NamedTemporaryFile(prefix="m2fp-loadtest-", suffix=".log", delete=False)
    server = subprocess.Popen([sys.executable, "-m", "m2fp_api.cli", "serve"], env=env,
                              stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    proc = psutil.Process(server.pid)
    peak_rss = 0
    sampling = threading.Event()

    def sample() -> None:
        nonlocal peak_rss
        while not sampling.wait(0.2):
            try:
                peak_rss = max(peak_rss, proc.memory_info().rss)
            except psutil.Error:
                return

    threading.Thread(target=sample, daemon=True).start()
    with httpx.Client(base_url=url, timeout=30) as c:
        for _ in range(600):
            try:
                if c.get("/readyz").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        idle_rss = proc.memory_info().rss
        model = c.get("/v1/model").json()
    print(f"service ready: slots={model['slots']}, idle RSS {idle_rss / 1e9:.2f} GB; {args.clients} clients, "
          f"{args.stallers} stalled connections and {args.slow} slow uploaders for {args.seconds:.0f} s",
          file=sys.stderr)

    photos = {size: [photo(*size, seed=i) for i in range(3)] for size in SIZES}
    normal, slow, stalled = Tally(), {pace: Tally() for pace in PACES}, Tally()
    stop_at = time.monotonic() + args.seconds
    threads = [threading.Thread(target=normal_client, args=(i, url, photos, stop_at, normal))
               for i in range(args.clients)]
    threads += [threading.Thread(target=slow_client, args=(i, port, PACES[name], photos, stop_at, slow[name]))
                for i, name in zip(range(args.slow), list(PACES) * args.slow)]
    threads.append(threading.Thread(target=stallers, args=(args.stallers, port, stop_at, stalled)))
    slot_samples: Counter = Counter()
    threads.append(threading.Thread(target=slot_use, args=(url, time.monotonic() + 10, stop_at, slot_samples)))
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    # every accepted task must reach a terminal status
    accepted = normal.accepted + slow["slow"].accepted + slow["trickle"].accepted
    final: Counter = Counter()
    errors: Counter = Counter()
    settle_end = time.monotonic() + args.settle
    with httpx.Client(base_url=url, timeout=30) as c:
        pending = set(accepted)
        while pending and time.monotonic() < settle_end:
            for task_id in list(pending):
                r = c.get(f"/v1/tasks/{task_id}")
                if r.status_code != 200:
                    final[f"http {r.status_code}"] += 1
                    pending.discard(task_id)
                    continue
                task = r.json()
                if task["status"] in ("succeeded", "failed", "cancelled"):
                    final[task["status"]] += 1
                    if task["error"]:
                        errors[task["error"]["code"]] += 1
                    pending.discard(task_id)
            time.sleep(1)
    sampling.set()
    server.terminate()
    server.wait(120)

    # a stalled connection may live a head or body timeout, plus a little scheduling slack
    stall_limit_s = max(settings.header_timeout_s, settings.body_timeout_s) + 10
    unexpected_5xx = sum(v for k, v in normal.outcomes.items()
                         if k.startswith("5") and k.split(":")[-1] not in CAPACITY_CODES)
    unanswered = sum(v for k, v in normal.outcomes.items() if not k.startswith(("200", "202", "503")))
    turned_away = sum(v for k, v in normal.outcomes.items() if k.split(":")[-1] in ABUSE_CODES)
    sampled = slot_samples["busy"] + slot_samples["idle"]
    slot_busy = slot_samples["busy"] / sampled if sampled else 0.0
    report = {
        "seconds": args.seconds, "slots": model["slots"],
        "normal": {"clients": args.clients, "served": len(normal.served_clients),
                   "responses": dict(normal.outcomes), "accepted": len(normal.accepted),
                   "turned_away_by_abuse": turned_away},
        "slow_uploads": {name: {"pace_kb_s": PACES[name] // 1024, "outcomes": dict(t.outcomes),
                                "longest_s": round(t.longest_open_s, 1)} for name, t in slow.items()},
        "stalled": {"connections": args.stallers, "outcomes": dict(stalled.outcomes),
                    "longest_open_s": round(stalled.longest_open_s, 1), "limit_s": stall_limit_s},
        "slot_busy_share": round(slot_busy, 3), "slot_samples": dict(slot_samples),
        "final": dict(final), "errors": dict(errors), "lost": len(pending),
        "unexpected_5xx": unexpected_5xx,
        "idle_rss_gb": round(idle_rss / 1e9, 3), "peak_rss_gb": round(peak_rss / 1e9, 3),
        "server_log": log.name,
    }
    print(json.dumps(report, indent=2))
    checks = {
        # with one slot the queue decides how many are served, as long as it stays fed
        "normal clients served": bool(normal.served_clients),
        "normal requests answered (accepted or told when to retry)": unanswered == 0,
        "the slot kept busy despite the abuse (>= 95 % of samples)": slot_busy >= 0.95,
        "nothing lost": not pending and not final.get("http 404"),
        "no unexpected 5xx": unexpected_5xx == 0,
        "peak RSS under 2 GiB": peak_rss < 2 * 2**30,
        "stalled connections closed in time": stalled.longest_open_s <= stall_limit_s,
        "uploads under the minimum pace never accepted": not slow["trickle"].accepted,
        "uploads at a slow but fair pace accepted": bool(slow["slow"].accepted) if args.slow else True,
    }
    for name, ok in checks.items():
        print(f"{'ok  ' if ok else 'FAIL'} {name}", file=sys.stderr)
    ok = all(checks.values())
    print("PASS" if ok else "FAIL", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
