"""Webhooks against a real service, in both deployments: deliveries signed so that the
Standard Webhooks reference library verifies them, retried after 500s, and refused for
addresses the service must not call, at submission and at connection."""

from __future__ import annotations

import base64
import http.server
import json
import os
import threading
import time
from pathlib import Path

import pytest
import standardwebhooks

from photos import jpeg
from server import DEPLOYMENTS, Deployment, Server

SECRET = "whsec_" + base64.b64encode(b"m2fp-api test webhook secret 32").decode()
REBINDING_DNS = Path(__file__).parent / "rebinding_dns"
WEBHOOKS = {"webhook_secret": SECRET, "webhook_allow": "127.0.0.0/8", "webhook_retry_s": 30}


class Receiver:
    """A webhook receiver on loopback: answers each POST with the next of `answers`
    (then 204) and keeps what it got."""

    def __init__(self) -> None:
        self.answers: list[int] = []
        self.received: list[tuple[dict[str, str], bytes]] = []
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                receiver.received.append((dict(self.headers), body))
                self.send_response(receiver.answers.pop(0) if receiver.answers else 204)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_port
        self.url = f"http://127.0.0.1:{self.port}/hooks/m2fp"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def wait(self, count: int, timeout: float = 60) -> list[tuple[dict[str, str], dict]]:
        """The first `count` deliveries, each verified: (headers, the task they carry)."""
        end = time.monotonic() + timeout
        while len(self.received) < count and time.monotonic() < end:
            time.sleep(0.05)
        assert len(self.received) >= count, self.received
        verifier = standardwebhooks.Webhook(SECRET)
        return [(headers, verifier.verify(body, headers)) for headers, body in self.received[:count]]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module", params=DEPLOYMENTS)
def server(request, tmp_path_factory):
    deployment = Deployment(tmp_path_factory.mktemp(request.param), request.param, **WEBHOOKS)
    yield deployment.server
    deployment.stop()


@pytest.fixture
def receiver():
    r = Receiver()
    yield r
    r.close()


def deliveries_settled(server: Server, task_id: str, timeout: float = 60) -> list[dict]:
    """The task's deliveries once each has been attempted and none is retrying."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        task = server.client.get(f"/v1/tasks/{task_id}").json()
        deliveries = task["webhook"]["deliveries"]
        if all(d["attempts"] and (d["delivered"] or d["error"]) for d in deliveries):
            return deliveries
        time.sleep(0.1)
    raise TimeoutError(task)


def test_started_and_completed_are_delivered_signed(server, receiver):
    r = server.submit(jpeg(96, 64, seed=101), webhook=receiver.url, webhook_events="completed, started")
    assert r.status_code == 202, r.text
    task = r.json()
    assert task["webhook"] == {"url": receiver.url, "deliveries": [
        {"event": e, "attempts": 0, "delivered": False, "status_code": None, "error": None,
         "last_attempt_at": None} for e in ("started", "completed")]}

    (started_headers, started), (completed_headers, completed) = receiver.wait(2)
    assert started["id"] == completed["id"] == task["id"]
    assert started["status"] in ("running", "succeeded") and started["started_at"]
    assert completed["status"] == "succeeded" and completed["result"]["image"] == {"width": 96, "height": 64}
    assert started_headers["webhook-id"] != completed_headers["webhook-id"]
    assert receiver.received[0][0]["Host"] == f"127.0.0.1:{receiver.port}"
    # the body is the task as GET /v1/tasks/{id} answers it (deliveries aside: they go on)
    polled = server.wait_status(task["id"])
    assert {k: v for k, v in completed.items() if k != "webhook"} == {k: v for k, v in polled.items() if k != "webhook"}

    for delivery in deliveries_settled(server, task["id"]):
        assert delivery["attempts"] == 1 and delivery["delivered"] and delivery["status_code"] == 204
    time.sleep(0.5)
    assert len(receiver.received) == 2  # once each


def test_a_failed_delivery_is_retried_with_the_same_id(server, receiver):
    receiver.answers = [500, 500]
    r = server.submit(jpeg(96, 64, seed=102), webhook=receiver.url)
    assert r.status_code == 202, r.text
    deliveries = receiver.wait(3)
    assert len({headers["webhook-id"] for headers, _ in deliveries}) == 1  # receivers de-duplicate by it
    assert all(task["status"] == "succeeded" for _, task in deliveries)
    [completed] = deliveries_settled(server, r.json()["id"])
    assert completed["event"] == "completed" and completed["attempts"] == 3
    assert completed["delivered"] and completed["status_code"] == 204


def test_each_batch_item_is_delivered_as_its_own_task(server, receiver):
    files = [("files", (f"{seed}.jpg", jpeg(96, 64, seed=seed), "image/jpeg")) for seed in (103, 104)]
    r = server.client.post("/v1/batch", files=files, data={"webhook": receiver.url})
    assert r.status_code == 202, r.text
    ids = {task["id"] for task in r.json()["tasks"]}
    assert {task["id"] for _, task in receiver.wait(2)} == ids


@pytest.mark.parametrize("url", [
    "http://10.0.0.1/hook", "http://192.168.1.20:8080/", "http://169.254.169.254/latest/meta-data/",
    "http://[fd00:ec2::254]/", "http://[::1]/", "http://[::ffff:10.0.0.1]/", "http://224.0.0.1/",
    "http://0.0.0.0/", "https://240.0.0.1/"])
def test_addresses_the_service_must_not_call_are_refused_at_submission(server, url):
    for path, files in (("/v1/parse", {"file": ("a.jpg", jpeg(32, 32), "image/jpeg")}),
                        ("/v1/batch", {"files": ("a.jpg", jpeg(32, 32), "image/jpeg")})):
        r = server.client.post(path, files=files, data={"webhook": url})
        assert r.status_code == 400, r.text
        assert r.json()["error"]["code"] == "webhook_refused"


@pytest.mark.parametrize("form", [
    {"webhook": "ftp://127.0.0.1/hook"}, {"webhook": "not a url"}, {"webhook": "http://u:p@127.0.0.1/"},
    {"webhook": "http://127.0.0.1:port/"}, {"webhook": "http://127.0.0.1/", "webhook_events": "finished"},
    {"webhook": "http://127.0.0.1/", "webhook_events": ","}, {"webhook_events": "completed"}])
def test_bad_webhook_fields_are_refused(server, form):
    r = server.submit(jpeg(32, 32), **form)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["code"] == "bad_request" and "webhook" in r.json()["error"]["message"]


def test_an_address_refused_when_connecting_gets_no_delivery(tmp_path, receiver):
    """The name passed the check at submission, then resolves to a private address:
    the delivery is refused, not retried, and the task is unaffected."""
    pythonpath = os.pathsep.join([str(REBINDING_DNS), os.environ.get("PYTHONPATH", "")])
    server = Server(tmp_path, extra_env={"PYTHONPATH": pythonpath}, **WEBHOOKS).wait_ready()
    try:
        r = server.submit(jpeg(96, 64, seed=105), webhook=f"http://rebinding.test:{receiver.port}/hook")
        assert r.status_code == 202, r.text
        assert server.wait_status(r.json()["id"])["status"] == "succeeded"
        [delivery] = deliveries_settled(server, r.json()["id"])
        assert delivery["attempts"] == 1 and not delivery["delivered"] and delivery["status_code"] is None
        assert "10.0.0.7" in delivery["error"]
        assert receiver.received == []
    finally:
        server.stop()


def test_webhooks_need_a_secret(tmp_path):
    server = Server(tmp_path, webhook_allow="127.0.0.0/8").wait_ready()
    try:
        r = server.submit(jpeg(32, 32), webhook="http://127.0.0.1:9/hook")
        assert r.status_code == 400 and "M2FP_WEBHOOK_SECRET" in r.json()["error"]["message"]
    finally:
        server.stop()


def test_a_bad_secret_is_refused_without_being_echoed(monkeypatch):
    from pydantic import ValidationError

    from m2fp_api.settings import Settings

    monkeypatch.setenv("M2FP_WEBHOOK_SECRET", "whsec_not-base64-but-secret")
    with pytest.raises(ValidationError) as refused:
        Settings()
    assert "webhook_secret" in str(refused.value) and "not-base64-but-secret" not in str(refused.value)
