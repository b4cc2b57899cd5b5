"""The two ways the service runs tasks, picked once from the settings: in this process
(in-memory store, the model loaded here), or in Celery workers (`M2FP_BROKER_URL`: the
Redis store, the workers' model). Nothing else asks which one it is."""

from __future__ import annotations

from ..settings import Settings
from .executor import Executor, InProcessExecutor
from .memory_plan import MB
from .store import MemoryStore, TaskStore


def store_and_executor(settings: Settings) -> tuple[TaskStore, Executor]:
    if settings.broker_url:
        # imported here: an in-process service needs neither Celery nor Redis
        from .celery_executor import CeleryExecutor
        from .redis_queue import RedisQueue
        from .redis_store import RedisStore

        store = RedisStore.from_settings(settings)
        return store, CeleryExecutor(store, RedisQueue(store.redis, settings), settings)
    store = MemoryStore(ttl_s=settings.result_ttl_s, max_finished=settings.max_results,
                        max_output_bytes=int(settings.max_result_mb * MB))
    return store, InProcessExecutor(store, settings)
