"""The task store's contract, the same for the in-memory store and the Redis one (a real
redis-server): shared work under separate handles, what a handle's DELETE does, and
the bounds (issue 11, items 5 and 6)."""

from __future__ import annotations

import time

from m2fp_api.tasks.task import TaskHandle, TaskOptions, TaskRecord, TaskStatus


def new_work(store, key: str) -> TaskRecord:
    """New work with its first handle (same id), as a submission creates it."""
    record = TaskRecord(id=f"{key}-w", options=TaskOptions(outputs=("mask",)), key=key)
    store.create(record, TaskHandle(id=record.id, work_id=record.id))
    return record


def finish(store, work_id: str) -> None:
    store.put_outputs(work_id, {"mask": b"png"})
    store.update(work_id, status=TaskStatus.succeeded)


def test_identical_submissions_share_work_under_their_own_handles(make_store):
    store = make_store()
    work = new_work(store, "k")
    held = store.share("k", "h2", owner=None)
    assert held.handle.id == "h2" and held.handle.cached and held.work.id == work.id
    assert store.lookup("h2").work.id == work.id and not store.lookup(work.id).handle.cached
    assert store.share("other-key", "h3", None) is None
    assert store.lookup("h3") is None


def test_deleting_one_handle_of_unfinished_work_cancels_that_handle_only(make_store):
    store = make_store()
    work = new_work(store, "k")
    store.share("k", "h2", None)
    assert store.release("h2") is None  # another handle still waits: nothing to cancel
    assert store.lookup("h2").work.status is TaskStatus.cancelled
    assert store.lookup(work.id).work.status is TaskStatus.queued
    finish(store, work.id)
    assert store.lookup(work.id).work.status is TaskStatus.succeeded
    assert store.lookup("h2").work.status is TaskStatus.cancelled  # its own view, kept
    store.release("h2")
    assert store.lookup("h2") is None and store.get_output(work.id, "mask") == b"png"


def test_the_last_handle_of_unfinished_work_hands_it_over_for_cancelling(make_store):
    store = make_store()
    work = new_work(store, "k")
    store.share("k", "h2", None)
    store.release("h2")
    orphan = store.release(work.id)
    assert orphan is not None and orphan.id == work.id
    assert store.share("k", "h3", None) is None  # not shared again
    store.update(work.id, status=TaskStatus.cancelled)  # what the executor then does
    assert store.get(work.id) is None  # nobody holds it: forgotten at once
    assert store.lookup(work.id).work.status is TaskStatus.cancelled


def test_finished_work_lives_while_a_handle_holds_it(make_store):
    store = make_store()
    work = new_work(store, "k")
    finish(store, work.id)
    shared = store.share("k", "h2", None)
    assert shared.work.status is TaskStatus.succeeded
    assert store.release(work.id) is None and store.lookup(work.id) is None
    assert store.get_output(work.id, "mask") == b"png"  # h2 still holds it
    store.release("h2")
    assert store.get(work.id) is None and store.get_output(work.id, "mask") is None
    assert store.share("k", "h3", None) is None


def test_count_bound_evicts_handles_on_finished_work_only(make_store):
    store = make_store(max_finished=2)
    works = [new_work(store, f"k{i}") for i in range(4)]
    waiting = new_work(store, "queued")
    for w in works:
        finish(store, w.id)
        time.sleep(0.01)
    assert [store.lookup(w.id) is not None for w in works] == [False, False, True, True]
    assert store.get(works[0].id) is None  # work goes with its last handle
    assert store.lookup(waiting.id).work.status is TaskStatus.queued


def test_unfinished_work_is_shared_by_a_bounded_number_of_handles(make_store):
    store = make_store(max_finished=3)
    new_work(store, "k")
    assert [store.share("k", f"h{i}", None) is not None for i in range(3)] == [True, True, False]


def test_a_cancelled_handle_expires_after_the_result_ttl(make_store):
    store = make_store(ttl_s=0.5)
    work = new_work(store, "k")
    store.share("k", "h2", None)
    store.release("h2")
    assert store.lookup("h2").work.expires_at <= time.time() + 0.5
    time.sleep(0.7)
    store.sweep()
    assert store.lookup("h2") is None and store.lookup(work.id).work.status is TaskStatus.queued


def test_redis_handles_expire_with_their_work(shared_redis):
    from m2fp_api.tasks.redis_store import RedisStore

    store = RedisStore(shared_redis.url, ttl_s=2, max_finished=10, unfinished_ttl_s=60)
    store.redis.flushdb()
    work = new_work(store, "k")
    store.share("k", "h2", None)
    finish(store, work.id)
    for key in (f"m2fp:task:{work.id}", "m2fp:task:h2", f"m2fp:work:{work.id}", f"m2fp:out:{work.id}:mask",
                f"m2fp:holders:{work.id}", "m2fp:key:k"):
        assert 0 < store.redis.pttl(key) <= 2000, key


def test_a_handles_webhook_and_its_deliveries_are_kept_with_it(make_store):
    from m2fp_api.webhooks.subscription import Delivery, Subscription

    store = make_store()
    work = new_work(store, "k")
    store.share("k", "h2", None)
    subscription = Subscription("https://hooks.example/x", [Delivery("started"), Delivery("completed")])
    store.put_webhook("h2", subscription)
    subscription.deliveries[0].attempts = 1  # the store keeps what it was given, not a live object
    assert store.lookup("h2").handle.webhook == Subscription(
        "https://hooks.example/x", [Delivery("started"), Delivery("completed")])
    assert store.lookup(work.id).handle.webhook is None  # the other submission asked for none
    store.put_webhook("h2", subscription)
    finish(store, work.id)
    assert store.lookup("h2").handle.webhook.deliveries[0].attempts == 1
    store.put_webhook("unknown", subscription)  # a handle that is gone: nothing to keep
    assert store.lookup("unknown") is None


def test_options_stored_by_the_previous_release_still_load():
    from m2fp_api.result_json import MaskFormat

    old = TaskOptions.from_dict({"outputs": ["mask", "parts"], "overlay_alpha": 0.5})
    assert (old.outputs, old.masks, old.model) == (("mask", "parts"), MaskFormat.none, None)
