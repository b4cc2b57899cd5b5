"""Real processes for the tests: `m2fp serve` (uvicorn), `m2fp worker` (Celery) and
redis-server, each on free loopback ports, and a deployment of them in either mode."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import PARITY

TINY_MULTIPLE = str(PARITY / "tiny-multiple")
TINY_SINGLE = str(PARITY / "tiny-single")
HAS_REDIS = shutil.which("redis-server") is not None
NO_REDIS = "Debian's redis-server is not installed (scripts/ensure-test-services.sh)"
needs_redis = pytest.mark.skipif(not HAS_REDIS, reason=NO_REDIS)
# how the service runs tasks: parametrise a fixture over these to test both
DEPLOYMENTS = ["in-process", pytest.param("cluster", marks=needs_redis)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, tmp_path: Path, extra_env: dict[str, str] | None = None, **settings) -> None:
        """`settings` become M2FP_ variables; `extra_env` sets other variables of the process."""
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {k: v for k, v in os.environ.items() if not k.startswith("M2FP_")}
        # no background compile: dozens of test servers would fight over two cores for
        # it (compilation is tested on its own, in test_backends)
        env.update({"M2FP_HOST": "127.0.0.1", "M2FP_PORT": str(self.port), "M2FP_MODEL": TINY_MULTIPLE,
                    "M2FP_CACHE_DIR": str(tmp_path / "cache"), "M2FP_ALLOW_DOWNLOAD": "false",
                    "M2FP_LOG_FORMAT": "json", "M2FP_COMPILE": "false", **(extra_env or {})})
        env.update({f"M2FP_{k.upper()}": v if isinstance(v, str) else json.dumps(v)
                    for k, v in settings.items()})
        self.log_path = tmp_path / f"server-{self.port}.log"
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "m2fp_api.cli", "serve"], env=env,
                                     stdout=self._log, stderr=subprocess.STDOUT)
        self.client = httpx.Client(base_url=self.url, timeout=60)

    def wait_ready(self, timeout: float = 60) -> "Server":
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited early:\n{self.log()}")
            try:
                if self.client.get("/readyz").status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"server not ready:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.client.close()
        self._log.close()
        return self.proc.returncode

    # -- helpers for tests ----------------------------------------------------------
    def submit(self, data: bytes, name: str = "photo.jpg", **form) -> httpx.Response:
        return self.client.post("/v1/parse", files={"file": (name, data, "application/octet-stream")},
                                data={k: str(v) for k, v in form.items()})

    def wait_status(self, task_id: str, statuses=("succeeded", "failed", "cancelled"),
                    timeout: float = 120) -> dict:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            r = self.client.get(f"/v1/tasks/{task_id}")
            assert r.status_code == 200, r.text
            task = r.json()
            if task["status"] in statuses:
                return task
            time.sleep(0.05)
        raise TimeoutError(f"task {task_id} never reached {statuses}: {task}")

    def metric(self, name: str, **labels: str) -> float:
        """The sum of the samples of `name` (e.g. `m2fp_tasks_total`) with these labels."""
        families = text_string_to_metric_families(self.client.get("/metrics").text)
        return sum(sample.value for family in families for sample in family.samples
                   if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()))

    def watch(self, task_id: str) -> "EventWatcher":
        return EventWatcher(self.url, task_id)


class EventWatcher(threading.Thread):
    """Reads a task's SSE stream in the background; `events` collects the Task dicts."""

    def __init__(self, url: str, task_id: str) -> None:
        super().__init__(daemon=True)
        self.url, self.task_id = url, task_id
        self.events: list[dict] = []
        self.kinds: list[str] = []
        self.opened = threading.Event()
        self.start()

    def run(self) -> None:
        with httpx.Client(base_url=self.url, timeout=120) as client:
            with client.stream("GET", f"/v1/tasks/{self.task_id}/events") as r:
                self.opened.set()
                kind = None
                for line in r.iter_lines():
                    if line.startswith("event:"):
                        kind = line.split(":", 1)[1].strip()
                    elif line.startswith("data:"):
                        self.kinds.append(kind)
                        if kind == "task":
                            self.events.append(json.loads(line.split(":", 1)[1]))

    @property
    def final(self) -> dict | None:
        return self.events[-1] if self.events else None


class Redis:
    """A real redis-server (Debian's) on a free loopback port, no persistence."""

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.start()

    def start(self) -> "Redis":
        self.proc = subprocess.Popen(
            [shutil.which("redis-server") or "redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
             "--save", "", "--appendonly", "no"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        end = time.monotonic() + 10
        while time.monotonic() < end:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return self
            except OSError:
                time.sleep(0.05)
        raise TimeoutError("redis-server did not start")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


class Worker:
    """A real `m2fp worker` (Celery, prefork) against the given Redis."""

    def __init__(self, tmp_path: Path, redis: Redis, **settings) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("M2FP_")}
        env.update({"M2FP_BROKER_URL": redis.url, "M2FP_MODEL": TINY_MULTIPLE,
                    "M2FP_CACHE_DIR": str(tmp_path / "cache"), "M2FP_ALLOW_DOWNLOAD": "false",
                    "M2FP_COMPILE": "false"})
        env.update({f"M2FP_{k.upper()}": v if isinstance(v, str) else json.dumps(v)
                    for k, v in settings.items()})
        self.log_path = tmp_path / f"worker-{free_port()}.log"
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "m2fp_api.cli", "worker"], env=env,
                                     stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)

    def children(self) -> list[int]:
        out = subprocess.run(["pgrep", "-P", str(self.proc.pid)], capture_output=True, text=True)
        return [int(p) for p in out.stdout.split()]

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
        self._log.close()


class Deployment:
    """A server in either mode: in-process, or in cluster mode with its own Redis and one
    worker, given the same settings."""

    def __init__(self, tmp: Path, mode: str, **settings) -> None:
        self.mode = mode
        self.redis = self.worker = None
        if mode == "cluster":
            self.redis = Redis()
            self.worker = Worker(tmp, self.redis, **settings)
            settings["broker_url"] = self.redis.url
        self.server = Server(tmp, **settings).wait_ready()

    def stop(self) -> None:
        self.server.stop()
        for part in (self.worker, self.redis):
            if part is not None:
                part.stop()
