"""Cluster mode faults and sharing: real redis-server, real Celery worker processes,
real API processes (shared/RELIABILITY.md item 19 and the scale-out issue)."""

from __future__ import annotations

import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor

from photos import big_jpeg, jpeg
from server import Server, Worker, needs_redis

pytestmark = needs_redis


def wait_workers(server: Server, count: int, timeout: float = 60) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        r = server.client.get("/v1/model")
        if r.status_code == 200 and r.json()["slots"] >= count:
            return
        time.sleep(0.2)
    raise TimeoutError(f"{count} workers never registered:\n{server.log()}")


def wait_counted(servers: list[Server], name: str, expected: float, timeout: float = 10, **labels) -> None:
    """Workers report how runs ended; the API processes collect the reports twice a second."""
    end = time.monotonic() + timeout
    while (seen := sum(s.metric(name, **labels) for s in servers)) != expected and time.monotonic() < end:
        time.sleep(0.2)
    assert seen == expected, (name, labels, seen)


def test_killed_worker_fails_its_task_not_running_forever(tmp_path, redis):
    worker = Worker(tmp_path, redis, worker_lost_after_s=3)
    api = Server(tmp_path, broker_url=redis.url, worker_lost_after_s=3).wait_ready()
    try:
        task = api.submit(big_jpeg(seed=31)).json()
        api.wait_status(task["id"], ("running",), timeout=60)
        for pid in worker.children():  # the process running the task
            os.kill(pid, signal.SIGKILL)
        failed = api.wait_status(task["id"], ("succeeded", "failed"), timeout=30)
        assert failed["status"] == "failed" and failed["error"]["code"] == "worker_lost"
        # Celery replaces the killed process; until the new one has loaded the model
        # there is no worker and the API says 503 not_ready, then the service goes on
        api.wait_ready(60)
        assert api.submit(jpeg(120, 90, seed=32), wait=60).json()["status"] == "succeeded"
    finally:
        api.stop()
        worker.stop()


def test_redis_down_is_503_and_the_service_recovers(tmp_path, redis):
    worker = Worker(tmp_path, redis)
    api = Server(tmp_path, broker_url=redis.url).wait_ready()
    try:
        done = api.submit(jpeg(100, 80, seed=33), wait=60).json()
        assert done["status"] == "succeeded"
        redis.stop()
        for call in (lambda: api.client.get(f"/v1/tasks/{done['id']}"),
                     lambda: api.submit(jpeg(100, 80, seed=34)),
                     lambda: api.client.get("/readyz"),
                     lambda: api.client.get("/v1/model")):
            r = call()
            assert r.status_code == 503, r.text
            assert r.json()["error"]["code"] == "store_unavailable"
        assert api.client.get("/healthz").status_code == 200
        assert api.client.get("/metrics").status_code == 200
        redis.start()  # same port, empty
        api.wait_ready(60)
        assert api.submit(jpeg(100, 80, seed=35), wait=60).json()["status"] == "succeeded"
        assert api.client.get(f"/v1/tasks/{done['id']}").status_code == 404  # Redis lost it
    finally:
        api.stop()
        worker.stop()


def test_two_apis_and_two_workers_share_one_redis(tmp_path, redis):
    workers = [Worker(tmp_path, redis), Worker(tmp_path, redis)]
    a = Server(tmp_path, broker_url=redis.url).wait_ready()
    b = Server(tmp_path, broker_url=redis.url).wait_ready()
    try:
        wait_workers(a, 2)
        tasks = [a.submit(jpeg(200, 150, seed=40 + i)).json() for i in range(4)]
        for t in tasks:
            seen = b.wait_status(t["id"])  # submitted to A, read from B
            assert seen["status"] == "succeeded"
            assert a.client.get(t["links"]["self"]).json() == seen
            assert b.client.get(seen["links"]["mask"]).content == a.client.get(seen["links"]["mask"]).content
        # de-duplication holds across APIs
        again = b.submit(jpeg(200, 150, seed=40), wait=30).json()
        assert again["id"] != tasks[0]["id"] and again["cached"] is True
        assert a.client.get(again["links"]["mask"]).content == a.client.get(f"/v1/tasks/{tasks[0]['id']}/mask.png").content
        # an Idempotency-Key holds across APIs, also for requests racing through both
        for round_ in range(3):
            photo, key = jpeg(200, 150, seed=60 + round_), {"Idempotency-Key": f"across-{round_}"}
            with ThreadPoolExecutor(4) as pool:
                answers = list(pool.map(lambda api: api.client.post(
                    "/v1/parse", files={"file": ("p.jpg", photo)}, headers=key), (a, b, a, b)))
            accepted = [r for r in answers if r.status_code in (200, 202)]
            assert all(r.status_code == 409 for r in answers if r not in accepted), [r.text for r in answers]
            assert accepted and len({r.json()["id"] for r in accepted}) == 1
            assert sum(r.headers.get("idempotent-replayed") != "true" for r in accepted) <= 1
            b.wait_status(accepted[0].json()["id"])
        # unknown ids are unknown everywhere (Celery's PENDING for unknown ids is not trusted)
        assert b.client.get("/v1/tasks/0123456789abcdef").status_code == 404
        # /metrics counts the workers' runs, each once over the API processes (the cached
        # submission and the replays did not run)
        wait_counted([a, b], "m2fp_tasks_total", 4 + 3, status="succeeded")
        wait_counted([a, b], "m2fp_stage_seconds_count", 4 + 3, stage="inference")
        time.sleep(1.0)  # two more collections: nothing is counted twice
        wait_counted([a, b], "m2fp_tasks_total", 4 + 3, timeout=0, status="succeeded")
        assert sum(s.metric("m2fp_stage_seconds_sum", stage="postprocessing") for s in (a, b)) > 0
    finally:
        a.stop()
        b.stop()
        for w in workers:
            w.stop()


def test_cluster_backpressure_and_cancellation(tmp_path, redis):
    worker = Worker(tmp_path, redis)
    api = Server(tmp_path, broker_url=redis.url, queue_size=1).wait_ready()
    try:
        running = api.submit(big_jpeg(seed=50)).json()
        api.wait_status(running["id"], ("running",), timeout=60)
        queued = api.submit(big_jpeg(seed=51)).json()
        assert api.client.get(f"/v1/tasks/{queued['id']}").json()["queue_position"] == 1
        full = api.submit(jpeg(90, 90, seed=52))
        assert full.status_code == 503 and full.json()["error"]["code"] == "queue_full"
        assert int(full.headers["retry-after"]) >= 1
        assert api.client.delete(f"/v1/tasks/{queued['id']}").status_code == 204
        assert api.client.get(f"/v1/tasks/{queued['id']}").json()["status"] == "cancelled"
        assert api.client.delete(f"/v1/tasks/{running['id']}").status_code == 204
        stopped = api.wait_status(running["id"], timeout=60)
        assert stopped["status"] == "cancelled"
        after = api.submit(jpeg(90, 90, seed=53), wait=60).json()
        assert after["status"] == "succeeded"
        assert api.client.get(f"/v1/tasks/{queued['id']}").json()["started_at"] is None
        # the run cancelled while running is counted; the task cancelled while queued never ran
        wait_counted([api], "m2fp_tasks_total", 1, status="cancelled")
        wait_counted([api], "m2fp_tasks_total", 1, status="succeeded")
    finally:
        api.stop()
        worker.stop()


def test_ttl_survives_status_updates(tmp_path, redis):
    # the worker finishes tasks, so it decides their expiry: it shares the API's settings
    worker = Worker(tmp_path, redis, result_ttl_s=3)
    api = Server(tmp_path, broker_url=redis.url, result_ttl_s=3).wait_ready()
    try:
        import redis as redis_client

        r = redis_client.Redis.from_url(redis.url)
        task = api.submit(jpeg(150, 100, seed=60), wait=60).json()
        for key in (f"m2fp:task:{task['id']}", f"m2fp:out:{task['id']}:mask"):
            ttl = r.pttl(key)
            assert 0 < ttl <= 3000, (key, ttl)
        time.sleep(3.3)
        assert api.client.get(f"/v1/tasks/{task['id']}").status_code == 404
        assert not list(r.scan_iter(f"m2fp:*{task['id']}*"))
    finally:
        api.stop()
        worker.stop()


def test_worker_process_is_replaced_past_its_memory_bound(tmp_path, redis):
    """Celery replaces a process that ended a task over M2FP_WORKER_MAX_MEMORY_MB (here
    1 MB: every process is over it), and the new process loads the model again."""
    worker = Worker(tmp_path, redis, worker_max_memory_mb=1)
    api = Server(tmp_path, broker_url=redis.url).wait_ready()
    try:
        before = set(worker.children())
        assert api.submit(jpeg(100, 80, seed=70), wait=60).json()["status"] == "succeeded"
        end = time.monotonic() + 60
        while time.monotonic() < end and (not worker.children() or set(worker.children()) == before):
            time.sleep(0.2)
        assert worker.children() and set(worker.children()) != before
        assert api.submit(jpeg(100, 80, seed=71), wait=60).json()["status"] == "succeeded"
    finally:
        api.stop()
        worker.stop()
