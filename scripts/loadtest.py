"""`make loadtest`: many concurrent clients against a real service with the full-size
random checkpoint, checking that nothing is lost, nothing but `queue_full` is a 5xx,
and the process stays under its memory ceiling. Not part of `make test` (minutes).

usage: python scripts/loadtest.py [--clients 32] [--seconds 120]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter

import httpx
import numpy as np
import psutil
from PIL import Image

from m2fp_api.bench import BENCH_SEED
from m2fp_api.engine.stand_in import BENCH_CONFIG, ensure_stand_in
from m2fp_api.settings import Settings

SIZES = [(640, 480), (1280, 720), (1920, 1080), (2592, 1944), (4000, 3000)]


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


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--seconds", type=float, default=120)
    ap.add_argument("--settle", type=float, default=900, help="max wait for accepted tasks after the load")
    args = ap.parse_args()

    model_dir = ensure_stand_in(BENCH_CONFIG, Settings().cache_dir, BENCH_SEED)
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
    print(f"service ready: slots={model['slots']}, idle RSS {idle_rss / 1e9:.2f} GB; "
          f"{args.clients} clients for {args.seconds:.0f} s", file=sys.stderr)

    photos = {size: [photo(*size, seed=i) for i in range(3)] for size in SIZES}
    lock = threading.Lock()
    statuses: Counter = Counter()
    accepted: list[str] = []
    stop_at = time.monotonic() + args.seconds

    def client(n: int) -> None:
        rng = random.Random(n)
        with httpx.Client(base_url=url, timeout=60) as c:
            while time.monotonic() < stop_at:
                size = rng.choice(SIZES)
                data = rng.choice(photos[size])
                # vary the options so that de-duplication does not answer everything
                alpha = round(rng.uniform(0.2, 0.8), 3)
                try:
                    r = c.post("/v1/parse", files={"file": ("p.jpg", data, "image/jpeg")},
                               data={"overlay_alpha": str(alpha)})
                except httpx.TransportError as exc:
                    with lock:
                        statuses[f"transport:{type(exc).__name__}"] += 1
                    continue
                code = r.json().get("error", {}).get("code") if r.status_code >= 400 else None
                with lock:
                    statuses[f"{r.status_code}{':' + code if code else ''}"] += 1
                if r.status_code in (200, 202):
                    with lock:
                        accepted.append(r.json()["id"])
                elif r.status_code == 503:
                    time.sleep(min(float(r.headers.get("retry-after", "1")), 10))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(args.clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    # every accepted task must reach a terminal status
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
    server_5xx = sum(v for k, v in statuses.items() if k.startswith("5") and k != "503:queue_full")
    report = {
        "clients": args.clients, "seconds": args.seconds, "slots": model["slots"],
        "responses": dict(statuses), "accepted": len(accepted), "final": dict(final),
        "errors": dict(errors), "lost": len(pending), "unexpected_5xx": server_5xx,
        "idle_rss_gb": round(idle_rss / 1e9, 3), "peak_rss_gb": round(peak_rss / 1e9, 3),
        "server_log": log.name,
    }
    print(json.dumps(report, indent=2))
    ok = not pending and server_5xx == 0 and peak_rss < 2 * 2**30 and not final.get("http 404")
    print("PASS" if ok else "FAIL", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
