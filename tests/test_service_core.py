"""The service core's contract without HTTP: the same cases over the in-memory store and
the Redis one (a real redis-server), through `Service` with an executor the test drives
(a queued task runs when the test says so, on the tiny model). Admission, de-duplication,
cancellation, outputs, results not ready yet, batches, waiting and watching, the
roll-back of work the executor would not take, and Idempotency-Key retries."""

from __future__ import annotations

import asyncio
import json
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from conftest import PARITY
from photos import jpeg

from m2fp_api.errors import (Draining, IdempotencyKeyInProgress, IdempotencyKeyReused, ImageTooSmall, NotFound,
                             NotLoaded, QueueFull, ResultNotReady, StoreUnavailable, UnknownModel,
                             UnsupportedMediaType)
from m2fp_api.settings import Settings
from m2fp_api.tasks.model_card import ModelCard
from m2fp_api.tasks.run import run_task
from m2fp_api.tasks.service import Service
from m2fp_api.tasks.store import CLAIM_GRACE_S
from m2fp_api.tasks.task import (Holding, IdempotencyClaim, Refusal, TaskOptions, TaskStatus, content_key,
                               idempotency_scope)

PHOTO = jpeg(96, 64, seed=1)
OPTIONS = TaskOptions(outputs=("mask", "parts"))
RETRY_AFTER_S = 7


class HeldExecutor:
    """An Executor whose queued tasks run only when the test calls `run_next`."""

    def __init__(self, store, *parsers, queue_size: int = 4) -> None:
        self.store, self.queue_size = store, queue_size
        self.parsers = {parser.info.id: parser for parser in parsers}
        # None: the models are not loaded
        self.cards: tuple[ModelCard, ...] | None = tuple(ModelCard.of(parser) for parser in parsers)
        self.refusal: Exception | None = None  # what submit raises instead of queueing
        self.refused: list[str] = []
        self.queue: list[tuple[str, bytes, TaskOptions]] = []
        self.on_finished = None
        self.draining = False
        self.slots = 1

    @property
    def models(self) -> tuple[ModelCard, ...]:
        if self.cards is None:
            raise NotLoaded("The model is still loading; retry shortly.")
        return self.cards

    def submit(self, task_id: str, payload: bytes, options: TaskOptions) -> None:
        if self.refusal is not None:
            self.refused.append(task_id)
            raise self.refusal
        if len(self.queue) >= self.queue_size:
            raise QueueFull("The queue is full; retry later.", RETRY_AFTER_S)
        self.queue.append((task_id, payload, options))

    def cancel(self, task_id: str) -> None:
        self.queue = [job for job in self.queue if job[0] != task_id]
        self.store.update(task_id, if_status=(TaskStatus.queued,), status=TaskStatus.cancelled)

    def queue_position(self, task_id: str) -> int | None:
        ids = [job[0] for job in self.queue]
        return ids.index(task_id) + 1 if task_id in ids else None

    def run_next(self) -> None:
        task_id, payload, options = self.queue.pop(0)
        run_task(self.parsers[options.model], self.store, task_id, payload, options, should_stop=lambda: None,
                 on_finished=self.on_finished)

    def depth(self) -> int:
        return len(self.queue)

    def in_flight(self) -> int:
        return 0

    def retry_after_s(self) -> int:
        return RETRY_AFTER_S

    def start(self) -> None:
        pass

    def admit(self, width: int, height: int) -> None:
        pass

    def drain(self, deadline_s: float) -> None:
        self.draining = True

    def still_running(self) -> bool:
        return False


@pytest.fixture
def core(make_store, multiple_parser) -> Service:
    store = make_store()
    return Service(Settings(), store, HeldExecutor(store, multiple_parser))


def rejected(core: Service, code: str) -> float:
    return core.metrics.registry.get_sample_value("m2fp_rejected_total", {"code": code}) or 0


async def each(*payloads: bytes):
    for payload in payloads:
        yield payload


async def collect(stream) -> list:
    return [item async for item in stream]


def test_a_submission_is_queued_and_its_callers_alone(core):
    held = core.submit(PHOTO, OPTIONS, "alice")
    assert held.work.status is TaskStatus.queued and not held.handle.cached
    assert core.view(core.get(held.handle.id, "alice")).queue_position == 1
    for task_id, owner in ((held.handle.id, "bob"), (held.handle.id, None), ("0123456789abcdef", "alice")):
        with pytest.raises(NotFound):
            core.get(task_id, owner)


def test_outputs_exist_once_the_task_has_succeeded(core):
    held = core.submit(PHOTO, OPTIONS, None)
    with pytest.raises(ResultNotReady) as not_ready:
        core.output(held.handle.id, None, "mask")
    assert (not_ready.value.status, not_ready.value.code) == (409, "result_not_ready")
    core.executor.run_next()
    done = core.get(held.handle.id, None).work
    assert done.status is TaskStatus.succeeded and core.view(core.get(held.handle.id, None)).queue_position is None
    assert core.output(held.handle.id, None, "mask").startswith(b"\x89PNG")
    assert json.loads(core.output(held.handle.id, None, "parts"))["image"] == {"width": 96, "height": 64}
    with pytest.raises(NotFound):
        core.output(held.handle.id, None, "overlay")  # not requested
    outcome = core.metrics.registry.get_sample_value("m2fp_tasks_total", {"status": "succeeded"})
    assert outcome == 1


def test_identical_submissions_share_work_under_their_own_ids(core):
    first = core.submit(PHOTO, OPTIONS, None)
    second = core.submit(PHOTO, OPTIONS, None)
    assert second.handle.cached and second.handle.id != first.handle.id
    assert second.work.id == first.work.id and core.executor.depth() == 1
    # another key, or other options, never share
    assert not core.submit(PHOTO, OPTIONS, "bob").handle.cached
    assert not core.submit(PHOTO, TaskOptions(outputs=("labels",)), None).handle.cached
    core.executor.run_next()
    again = core.submit(PHOTO, OPTIONS, None)
    assert again.handle.cached and again.work.status is TaskStatus.succeeded
    assert core.output(again.handle.id, None, "mask") == core.output(first.handle.id, None, "mask")


def test_shared_work_is_cancelled_with_its_last_holder(core):
    first = core.submit(PHOTO, OPTIONS, None)
    second = core.submit(PHOTO, OPTIONS, None)
    with pytest.raises(NotFound):
        core.cancel(second.handle.id, "bob")
    core.cancel(second.handle.id, None)
    assert core.get(second.handle.id, None).work.status is TaskStatus.cancelled
    assert core.get(first.handle.id, None).work.status is TaskStatus.queued and core.executor.depth() == 1
    core.cancel(first.handle.id, None)
    assert core.get(first.handle.id, None).work.status is TaskStatus.cancelled and core.executor.depth() == 0
    assert not core.submit(PHOTO, OPTIONS, None).handle.cached  # cancelled work is not shared


def test_deleting_a_finished_task_forgets_it(core):
    held = core.submit(PHOTO, OPTIONS, None)
    core.executor.run_next()
    core.cancel(held.handle.id, None)
    with pytest.raises(NotFound):
        core.get(held.handle.id, None)
    with pytest.raises(NotFound):
        core.output(held.handle.id, None, "mask")


@pytest.mark.parametrize("refusal", [StoreUnavailable("broker unreachable"),
                                     QueueFull("The queue is full; retry later.", RETRY_AFTER_S),
                                     Draining("The service is shutting down; try another instance.")],
                         ids=["store_unavailable", "queue_full", "draining"])
def test_work_the_executor_refuses_is_rolled_back(core, refusal):
    core.executor.refusal = refusal
    with pytest.raises(type(refusal)):
        core.submit(PHOTO, OPTIONS, None)
    [task_id] = core.executor.refused
    assert core.store.get(task_id) is None and core.store.lookup(task_id) is None
    core.executor.refusal = None
    assert not core.submit(PHOTO, OPTIONS, None).handle.cached  # nothing was left to share
    if isinstance(refusal, QueueFull):
        assert rejected(core, "queue_full") == 1


def test_admission_refuses_before_anything_is_stored(core):
    with pytest.raises(ImageTooSmall):
        core.submit(jpeg(4000, 8), OPTIONS, None)
    with pytest.raises(UnsupportedMediaType):
        core.submit(b"not an image at all", OPTIONS, None)
    cards, core.executor.cards = core.executor.cards, None
    with pytest.raises(NotLoaded):
        core.submit(PHOTO, OPTIONS, None)
    core.executor.cards = cards
    core.drain()
    with pytest.raises(Draining):
        core.require_ready()
    assert core.executor.depth() == 0 and core.executor.refused == []
    assert [rejected(core, c) for c in ("image_too_small", "unsupported_media_type", "not_ready")] == [1, 1, 1]


def test_a_batch_takes_what_fits_and_says_when_to_resubmit_the_rest(core):
    core.executor.queue_size = 2
    photos = [jpeg(96, 64, seed=10 + i) for i in range(3)]
    batch = asyncio.run(core.submit_batch(each(*photos, b"not an image"), OPTIONS, None))
    assert [type(item) for item in batch.items] == [Holding, Holding, Refusal, Refusal]
    assert [item.code for item in batch.items[2:]] == ["queue_full", "unsupported_media_type"]
    assert batch.retry_after_s == RETRY_AFTER_S and len(batch.capacity_refused) == 1
    with pytest.raises(QueueFull):  # nothing fits: refused whole
        asyncio.run(core.submit_batch(each(photos[2]), OPTIONS, None))
    assert core.executor.depth() == 2


def test_wait_and_watch_follow_a_task_to_its_end(core):
    held = core.submit(PHOTO, OPTIONS, None)
    assert asyncio.run(core.wait(held, 0.1)).work.status is TaskStatus.queued  # gave up waiting

    async def follow() -> tuple[tuple, list]:
        stream = core.watch(held.handle.id)
        first = await anext(stream)
        seen = (first.held.work.status, first.queue_position)  # read now: memory records are live
        core.executor.run_next()
        return seen, await collect(stream)

    first, rest = asyncio.run(follow())
    assert first == (TaskStatus.queued, 1)
    assert rest[-1].held.work.status is TaskStatus.succeeded and rest[-1].queue_position is None
    assert asyncio.run(core.wait(held, 5)).work.status is TaskStatus.succeeded
    [finished] = asyncio.run(collect(core.watch(held.handle.id)))  # ended: one view, then the end
    assert finished.held.work.status is TaskStatus.succeeded
    core.cancel(held.handle.id, None)
    assert asyncio.run(collect(core.watch(held.handle.id))) == [None]  # gone


@pytest.fixture
def two_models(make_store, multiple_parser, single_parser) -> Service:
    store = make_store()
    return Service(Settings(), store, HeldExecutor(store, multiple_parser, single_parser))


def test_each_task_runs_on_the_model_it_names_the_first_by_default(two_models):
    core = two_models
    multiple, single = (card.info.id for card in core.models())
    photo = (PARITY / "images" / "astronaut.jpg").read_bytes()  # people: the multi-person model finds them
    default = core.submit(photo, OPTIONS, None)
    assert default.work.options.model == multiple  # named before it is stored: workers run it as such
    named = core.submit(photo, TaskOptions(outputs=OPTIONS.outputs, model=single), None)
    # the same photo and options on another model is other work, never shared
    assert not named.handle.cached and named.work.id != default.work.id
    assert core.submit(photo, TaskOptions(outputs=OPTIONS.outputs, model=multiple), None).handle.cached
    core.executor.run_next()
    core.executor.run_next()
    docs = {held.work.options.model: json.loads(core.output(held.handle.id, None, "parts"))
            for held in (default, named)}
    assert docs[multiple]["model"]["id"] == multiple and docs[multiple]["persons"]
    assert docs[single]["model"]["id"] == single and docs[single]["persons"] == []


def test_a_model_not_loaded_is_refused_before_anything_is_stored(two_models):
    core = two_models
    unknown = TaskOptions(outputs=OPTIONS.outputs, model="no-such-model")
    with pytest.raises(UnknownModel) as refused:
        core.submit(PHOTO, unknown, None)
    assert (refused.value.status, refused.value.code) == (400, "unknown_model")
    assert "tiny-multiple" in refused.value.message  # says what is loaded
    with pytest.raises(UnknownModel):
        asyncio.run(core.submit_batch(each(PHOTO), unknown, None))
    assert core.executor.depth() == 0 and rejected(core, "unknown_model") == 1


def test_a_retry_with_its_idempotency_key_answers_the_first_task(core):
    first = core.submit(PHOTO, OPTIONS, "alice", idempotency_key="order-1")
    again = core.submit(PHOTO, OPTIONS, "alice", idempotency_key="order-1")
    assert again.replayed and not first.replayed
    assert again.handle.id == first.handle.id and core.executor.depth() == 1
    assert core.metrics.registry.get_sample_value("m2fp_replays_total") == 1
    # another owner's key of the same name is another key: its own task (sharing the work
    # only as any identical submission of that owner would)
    bobs = core.submit(PHOTO, OPTIONS, "bob", idempotency_key="order-1")
    assert not bobs.replayed and bobs.handle.id != first.handle.id
    # other options, or another photo, under a used key: refused, nothing created
    with pytest.raises(IdempotencyKeyReused) as reused:
        core.submit(PHOTO, TaskOptions(outputs=("labels",)), "alice", idempotency_key="order-1")
    assert (reused.value.status, reused.value.code) == (422, "idempotency_key_reused")
    with pytest.raises(IdempotencyKeyReused):
        core.submit(jpeg(96, 64, seed=2), OPTIONS, "alice", idempotency_key="order-1")
    assert core.executor.depth() == 2
    core.executor.run_next()
    done = core.submit(PHOTO, OPTIONS, "alice", idempotency_key="order-1")
    assert done.replayed and done.handle.id == first.handle.id and done.work.status is TaskStatus.succeeded


def test_an_idempotency_key_lives_as_long_as_its_task(core):
    first = core.submit(PHOTO, OPTIONS, None, idempotency_key="k")
    core.executor.run_next()
    core.cancel(first.handle.id, None)  # the finished task is forgotten, and its key with it
    # (once its claim is past the grace given to a request still creating its task)
    stale = IdempotencyClaim(handle_id=first.handle.id, content_key="x", at=time.time() - CLAIM_GRACE_S - 1)
    scope = idempotency_scope("k", None)
    core.store.unclaim(scope, first.handle.id)
    assert core.store.claim(scope, stale) is None
    again = core.submit(jpeg(96, 64, seed=2), OPTIONS, None, idempotency_key="k")  # free again: any request
    assert not again.replayed and again.handle.id != first.handle.id


def test_a_key_refused_work_frees_and_a_claim_is_taken_once(core):
    core.executor.refusal = QueueFull("The queue is full; retry later.", RETRY_AFTER_S)
    with pytest.raises(QueueFull):
        core.submit(PHOTO, OPTIONS, None, idempotency_key="k")
    core.executor.refusal = None
    held = core.submit(PHOTO, OPTIONS, None, idempotency_key="k")  # the retry creates the work
    assert not held.replayed and core.executor.depth() == 1
    # two racing claims of one key: one takes it, the other is told who holds it
    scope = idempotency_scope("race", None)
    key = content_key(PHOTO, OPTIONS.for_model(core.executor.models[0].info), None)
    claims = [IdempotencyClaim(handle_id=f"h{i}", content_key=key) for i in range(8)]
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda c: core.store.claim(scope, c), claims))
    winners = [c for c, answer in zip(claims, answers) if answer is None]
    assert len(winners) == 1 and all(a == winners[0] for a in answers if a is not None)
    with pytest.raises(IdempotencyKeyInProgress):  # the winner has not created its task yet
        core.submit(PHOTO, OPTIONS, None, idempotency_key="race")


def test_a_batch_key_stands_for_each_item_by_position(core):
    core.executor.queue_size = 1
    photos = [jpeg(96, 64, seed=10 + i) for i in range(2)]
    first = asyncio.run(core.submit_batch(each(*photos), OPTIONS, None, idempotency_key="b"))
    assert [type(i) for i in first.items] == [Holding, Refusal] and first.items[1].code == "queue_full"
    core.executor.run_next()
    retry = asyncio.run(core.submit_batch(each(*photos), OPTIONS, None, idempotency_key="b"))
    accepted, resubmitted = retry.items
    assert accepted.replayed and accepted.handle.id == first.items[0].handle.id
    assert isinstance(resubmitted, Holding) and not resubmitted.replayed and core.executor.depth() == 1
    # one item changed: that item fails alone; all changed: the batch is refused
    mixed = asyncio.run(core.submit_batch(each(photos[0], PHOTO), OPTIONS, None, idempotency_key="b"))
    assert mixed.items[0].replayed and mixed.items[1].code == "idempotency_key_reused"
    with pytest.raises(IdempotencyKeyReused):
        asyncio.run(core.submit_batch(each(PHOTO, PHOTO), OPTIONS, None, idempotency_key="b"))
    assert core.executor.depth() == 1


def test_an_idempotency_key_holds_across_services_sharing_a_redis(shared_redis, multiple_parser):
    """Two API processes in cluster mode: each with its own RedisStore, on one Redis."""
    from m2fp_api.tasks.redis_store import RedisStore

    a, b = (RedisStore(shared_redis.url, ttl_s=60, max_finished=100, unfinished_ttl_s=60) for _ in range(2))
    a.redis.flushdb()
    first, second = (Service(Settings(), store, HeldExecutor(store, multiple_parser)) for store in (a, b))
    held = first.submit(PHOTO, OPTIONS, "alice", idempotency_key="k")
    again = second.submit(PHOTO, OPTIONS, "alice", idempotency_key="k")
    assert again.replayed and again.handle.id == held.handle.id and second.executor.depth() == 0
    with pytest.raises(IdempotencyKeyReused):
        second.submit(PHOTO, TaskOptions(outputs=("labels",)), "alice", idempotency_key="k")


def test_a_replay_keeps_the_first_submissions_webhook(core):
    from m2fp_api.webhooks.subscription import parse_subscription

    first = core.submit(PHOTO, OPTIONS, None, idempotency_key="k",
                        webhook=parse_subscription("http://127.0.0.1:9/first", None))
    again = core.submit(PHOTO, OPTIONS, None, idempotency_key="k",
                        webhook=parse_subscription("http://127.0.0.1:9/second", None))
    assert again.replayed and again.handle.id == first.handle.id
    assert core.get(first.handle.id, None).handle.webhook.url == "http://127.0.0.1:9/first"
    assert list(core.webhooks._watches) == [first.handle.id]  # watched once, for the first
