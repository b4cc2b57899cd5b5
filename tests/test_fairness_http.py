"""One client must not hurt another (issue 11, items 5-8), over real HTTP against a real
uvicorn, in-process and in cluster mode (real redis-server, real Celery worker):

- refused batch items never evict accepted results;
- identical uploads share work and outputs, never the handle: each submission has its
  own id, DELETE acts on that id only, and with API keys a task is its key's alone;
- Retry-After spreads refused clients over the time slots are likely to free;
- a batch larger than the free queue says which items to resubmit, or is a 503.
"""

from __future__ import annotations

import pytest

from photos import big_jpeg, jpeg
from server import DEPLOYMENTS, Deployment, Server

from m2fp_api.tasks.pacing import RETRY_AFTER_MAX_S

# one inference at a time and one queue place, so a big photo holds the service busy
# for seconds while the test fills the queue behind it
SETTINGS = {"slots": 1, "queue_size": 1, "max_results": 4}


@pytest.fixture(scope="module", params=DEPLOYMENTS)
def server(request, tmp_path_factory):
    deployment = Deployment(tmp_path_factory.mktemp(request.param), request.param, **SETTINGS)
    yield deployment.server
    deployment.stop()


def busy(server: Server, seed: int) -> dict:
    """Occupy the one slot with seconds of work; returns that task once it runs."""
    task = server.submit(big_jpeg(seed=seed)).json()
    server.wait_status(task["id"], ("running",), timeout=60)
    return task


def batch(server: Server, photos: list[bytes], **headers):
    files = [("files", (f"{i}.jpg", data, "image/jpeg")) for i, data in enumerate(photos)]
    return server.client.post("/v1/batch", files=files, headers=headers)


# -- item 5: refused items do not displace accepted work ------------------------------

def test_refused_batch_items_do_not_evict_accepted_results(server):
    done = server.submit(jpeg(64, 48, seed=500), wait=60).json()
    assert done["status"] == "succeeded"
    refused = []
    for _ in range(2):  # far more refused items than M2FP_MAX_RESULTS
        r = batch(server, [b"x"] * 40)
        assert r.status_code == 202, r.text
        refused += r.json()["tasks"]
    kept = server.client.get(f"/v1/tasks/{done['id']}")
    assert kept.status_code == 200 and kept.json()["status"] == "succeeded", kept.text
    assert server.client.get(done["links"]["mask"]).status_code == 200
    for item in refused:
        assert item["status"] == "failed" and item["error"]["code"] == "unsupported_media_type"
        # not kept: the answer says so, and the id reads as expired
        assert item["expires_at"] == item["finished_at"]
        assert server.client.get(item["links"]["self"]).status_code == 404


# -- item 6: shared work, separate handles ---------------------------------------------

def test_identical_submissions_share_work_never_the_handle(server):
    blocker = busy(server, seed=600)
    data = jpeg(120, 90, seed=601)
    a = server.submit(data).json()
    b = server.submit(data).json()
    assert a["status"] == b["status"] == "queued"
    assert a["id"] != b["id"] and a["cached"] is False and b["cached"] is True
    assert b["queue_position"] == a["queue_position"] == 1
    # B's DELETE cancels B's task only: A's queued work goes on
    assert server.client.delete(f"/v1/tasks/{b['id']}").status_code == 204
    assert server.client.get(f"/v1/tasks/{b['id']}").json()["status"] == "cancelled"
    assert server.client.get(f"/v1/tasks/{a['id']}").json()["status"] == "queued"
    assert server.client.delete(f"/v1/tasks/{b['id']}").status_code == 204  # then forgets it
    assert server.client.get(f"/v1/tasks/{b['id']}").status_code == 404
    assert server.wait_status(a["id"], timeout=120)["status"] == "succeeded"
    mask = server.client.get(f"/v1/tasks/{a['id']}/mask.png").content
    # a later identical submission shares the finished outputs under its own id
    c = server.submit(data).json()
    assert c["id"] not in (a["id"], b["id"]) and c["cached"] is True and c["status"] == "succeeded"
    assert server.client.get(c["links"]["mask"]).content == mask
    assert server.client.delete(f"/v1/tasks/{c['id']}").status_code == 204
    assert server.client.get(f"/v1/tasks/{a['id']}/mask.png").content == mask
    # A's DELETE does not take the outputs from D, who still holds them
    d = server.submit(data).json()
    assert d["cached"] is True
    assert server.client.delete(f"/v1/tasks/{a['id']}").status_code == 204
    assert server.client.get(f"/v1/tasks/{a['id']}").status_code == 404
    assert server.client.get(f"/v1/tasks/{a['id']}/mask.png").status_code == 404
    assert server.client.get(d["links"]["mask"]).content == mask
    # once nobody holds the work, it is gone: the next identical upload runs again
    assert server.client.delete(f"/v1/tasks/{d['id']}").status_code == 204
    e = server.submit(data, wait=60).json()
    assert e["cached"] is False and e["status"] == "succeeded"
    server.wait_status(blocker["id"])


def test_cancelling_the_last_handle_cancels_the_work(server):
    blocker = busy(server, seed=610)
    data = jpeg(120, 90, seed=611)
    a = server.submit(data).json()
    assert server.client.delete(f"/v1/tasks/{a['id']}").status_code == 204
    assert server.client.get(f"/v1/tasks/{a['id']}").json()["status"] == "cancelled"
    # the cancelled work is not handed to the next identical upload
    b = server.submit(data).json()
    assert b["cached"] is False and b["status"] == "queued"
    assert server.wait_status(b["id"], timeout=120)["status"] == "succeeded"
    assert server.client.get(f"/v1/tasks/{a['id']}").json()["status"] == "cancelled"
    server.wait_status(blocker["id"])


@pytest.mark.parametrize("mode", DEPLOYMENTS)
def test_with_api_keys_a_task_is_its_keys_alone(tmp_path, mode):
    deployment = Deployment(tmp_path, mode, api_key="alice-key,bob-key")
    server = deployment.server
    alice, bob = {"X-API-Key": "alice-key"}, {"Authorization": "Bearer bob-key"}
    try:
        data = jpeg(100, 80, seed=620)
        mine = server.client.post("/v1/parse", files={"file": ("a.jpg", data)}, data={"wait": "60"},
                                  headers=alice).json()
        assert mine["status"] == "succeeded"
        for path in ("", "/mask.png", "/parts.json", "/events"):
            r = server.client.get(f"/v1/tasks/{mine['id']}{path}", headers=bob)
            assert r.status_code == 404 and r.json()["error"]["code"] == "not_found", (path, r.text)
        assert server.client.delete(f"/v1/tasks/{mine['id']}", headers=bob).status_code == 404
        # the same photo from another key is that key's own work: nothing tells Bob that
        # Alice sent it
        theirs = server.client.post("/v1/parse", files={"file": ("a.jpg", data)}, data={"wait": "60"},
                                    headers=bob).json()
        assert theirs["cached"] is False and theirs["id"] != mine["id"]
        assert server.client.get(f"/v1/tasks/{theirs['id']}", headers=alice).status_code == 404
        assert server.client.get(f"/v1/tasks/{mine['id']}", headers=alice).json()["status"] == "succeeded"
        r = server.client.post("/v1/batch", files=[("files", ("b.jpg", data))], headers=alice)
        shared = r.json()["tasks"][0]
        assert shared["cached"] is True and server.client.get(shared["links"]["self"], headers=bob).status_code == 404
    finally:
        deployment.stop()


# -- item 8: a batch larger than the free queue -----------------------------------------

def test_batch_larger_than_the_free_queue_says_what_to_resubmit(server):
    blocker = busy(server, seed=800)
    r = batch(server, [jpeg(80, 60, seed=801 + i) for i in range(3)])
    assert r.status_code == 202, r.text
    tasks = r.json()["tasks"]
    assert tasks[0]["status"] == "queued" and tasks[0]["retry_after_s"] is None
    refused = tasks[1:]
    for item in refused:
        assert item["status"] == "failed" and item["error"]["code"] == "queue_full"
        assert 1 <= item["retry_after_s"] <= RETRY_AFTER_MAX_S
    assert r.headers["capacity-refused"] == "2"
    assert int(r.headers["retry-after"]) == max(item["retry_after_s"] for item in refused)
    # nothing fits: the whole batch is refused, with Retry-After
    full = batch(server, [jpeg(80, 60, seed=804 + i) for i in range(2)])
    assert full.status_code == 503 and full.json()["error"]["code"] == "queue_full"
    assert 1 <= int(full.headers["retry-after"]) <= RETRY_AFTER_MAX_S
    # a batch of bad files only is still answered item by item
    bad = batch(server, [b"x", b"y"])
    assert bad.status_code == 202 and "capacity-refused" not in bad.headers
    assert server.wait_status(tasks[0]["id"], timeout=120)["status"] == "succeeded"
    server.wait_status(blocker["id"])


# -- item 7: Retry-After keeps the queue fed -------------------------------------------

@pytest.mark.parametrize("mode", DEPLOYMENTS)
def test_retry_after_spreads_refused_clients(tmp_path, mode):
    """A fresh service (no pace measured yet, so the default pace) with its one slot busy
    and its queue full: each refused client is told a different, bounded time."""
    deployment = Deployment(tmp_path, mode, **SETTINGS)
    server = deployment.server
    try:
        busy(server, seed=700)
        queued = server.submit(jpeg(80, 60, seed=701)).json()
        answers = [server.submit(jpeg(80, 60, seed=710 + i)) for i in range(8)]
        assert all(r.status_code == 503 for r in answers), [r.text for r in answers]
        waits = [int(r.headers["retry-after"]) for r in answers]
        assert all(1 <= w <= RETRY_AFTER_MAX_S for w in waits), waits
        # later refusals are sent later: the clients do not all come back at once
        assert len(set(waits)) >= 4, waits
        assert sum(waits[4:]) > sum(waits[:4]), waits
        server.client.delete(f"/v1/tasks/{queued['id']}")
    finally:
        deployment.stop()
