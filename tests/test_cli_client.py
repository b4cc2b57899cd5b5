"""`m2fp parse --server`: the CLI as a client of a real service writes what local parsing
writes, a re-run parses nothing again, and refusals with Retry-After are retried."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import httpx
import pytest

from conftest import PARITY
from m2fp_api.client import Client, ServiceError
from m2fp_api.outputs import OUTPUTS
from server import TINY_MULTIPLE, Server

PHOTOS = [str(PARITY / "images" / name) for name in ("astronaut.jpg", "two_figures.png")]
KEY = "client-test-key"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = Server(tmp_path_factory.mktemp("client"), api_key=KEY).wait_ready()
    s.client.headers["X-API-Key"] = KEY
    yield s
    s.stop()


def m2fp(*args: str, **env: str) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("M2FP_")}
    return subprocess.run([sys.executable, "-m", "m2fp_api.cli", *args], capture_output=True, text=True,
                          env={**environ, **env}, timeout=300)


def without_timings(document: bytes) -> dict:
    """parts.json less its stage timings: the one part that differs from run to run."""
    doc = json.loads(document)
    doc.pop("timings_ms")
    return doc


def test_the_client_writes_what_local_parsing_writes_and_a_rerun_parses_nothing(server, tmp_path):
    local, remote = tmp_path / "local", tmp_path / "remote"
    made = m2fp("parse", *PHOTOS, "--out", str(local), "--model", TINY_MULTIPLE)
    assert made.returncode == 0, made.stderr
    sent = m2fp("parse", *PHOTOS, "--out", str(remote), "--server", server.url, M2FP_CLIENT_API_KEY=KEY)
    assert sent.returncode == 0, sent.stderr
    assert "stand-in" in sent.stderr  # the service's model is announced as local parsing does
    names = sorted(p.name for p in local.iterdir())
    assert names == sorted(p.name for p in remote.iterdir())
    assert len(names) == len(PHOTOS) * len(OUTPUTS)
    for name in names:
        mine, theirs = (local / name).read_bytes(), (remote / name).read_bytes()
        if name.endswith(".json"):
            assert without_timings(mine) == without_timings(theirs), name
        else:
            assert mine == theirs, name
    ran = server.metric("m2fp_tasks_total")
    assert ran == len(PHOTOS)

    # a re-run sends the same Idempotency-Keys: the first run's tasks answer, nothing runs
    again = m2fp("parse", *PHOTOS, "--out", str(tmp_path / "again"), "--server", server.url,
                 "--api-key", KEY)
    assert again.returncode == 0, again.stderr
    assert server.metric("m2fp_tasks_total") == ran and server.metric("m2fp_replays_total") == len(PHOTOS)
    for name in names:
        assert (tmp_path / "again" / name).read_bytes() == (remote / name).read_bytes()


def test_the_client_reports_refusals_and_goes_on(server, tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not a jpeg")
    proc = m2fp("parse", str(bad), PHOTOS[1], "--out", str(tmp_path), "--outputs", "labels",
                "--server", server.url, "--api-key", KEY)
    assert proc.returncode == 1
    assert "unsupported_media_type" in proc.stderr and "Traceback" not in proc.stderr
    assert (tmp_path / "two_figures.labels.png").exists() and not (tmp_path / "two_figures.mask.png").exists()
    unauthorised = m2fp("parse", PHOTOS[1], "--out", str(tmp_path), "--server", server.url)
    assert unauthorised.returncode == 1 and "unauthorized" in unauthorised.stderr


def refusing(times: int, code: str = "queue_full"):
    """A service that refuses `times` times with Retry-After: 0, then answers."""
    calls = []

    def answer(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        if len(calls) <= times:
            return httpx.Response(503, headers={"Retry-After": "0"},
                                  json={"error": {"code": code, "message": "later"}})
        return httpx.Response(200, json={"ok": True})
    return answer, calls


@pytest.mark.parametrize("code", ["queue_full", "not_ready"])
def test_refusals_with_retry_after_are_retried_a_bounded_number_of_times(code):
    answer, calls = refusing(2, code)
    client = Client("http://service", None, retries=2)
    client.http = httpx.Client(base_url="http://service", transport=httpx.MockTransport(answer))
    assert client.request("GET", "/v1/model").json() == {"ok": True} and len(calls) == 3

    answer, calls = refusing(5, code)
    client.http = httpx.Client(base_url="http://service", transport=httpx.MockTransport(answer))
    with pytest.raises(ServiceError) as refused:
        client.request("GET", "/v1/model")
    assert refused.value.code == code and len(calls) == 3


def test_other_errors_are_not_retried():
    answer, calls = refusing(1, "model_unavailable")
    client = Client("http://service", None, retries=5)
    client.http = httpx.Client(base_url="http://service", transport=httpx.MockTransport(answer))
    with pytest.raises(ServiceError):
        client.request("GET", "/v1/model")
    assert len(calls) == 1
