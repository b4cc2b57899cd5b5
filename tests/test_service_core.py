"""The service core's contract without HTTP: the same cases over the in-memory store and
the Redis one (a real redis-server), through `Service` with an executor the test drives
(a queued task runs when the test says so, on the tiny model). Admission, de-duplication,
cancellation, outputs, results not ready yet, batches, waiting and watching, and the
roll-back of work the executor would not take."""

from __future__ import annotations

import asyncio
import json

import pytest

from conftest import PARITY
from photos import jpeg

from m2fp_api.errors import (Draining, ImageTooSmall, NotFound, NotLoaded, QueueFull, ResultNotReady, StoreUnavailable,
                             UnknownModel, UnsupportedMediaType)
from m2fp_api.settings import Settings
from m2fp_api.tasks.model_card import ModelCard
from m2fp_api.tasks.run import run_task
from m2fp_api.tasks.service import Service
from m2fp_api.tasks.task import Holding, Refusal, TaskOptions, TaskStatus

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
