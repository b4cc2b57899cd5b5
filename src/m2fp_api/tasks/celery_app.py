"""The Celery application shared by API processes (which send) and workers (which run).

Only task ids travel through the broker; the upload waits in Redis (redis_queue.py), and
statuses, progress and outputs live in the Redis task store, so a Celery result backend
is not used.
"""

from __future__ import annotations

from celery import Celery

from ..settings import Settings

QUEUE = "m2fp"
TASK_NAME = "m2fp.parse"
# beyond the run limit, Celery kills a task that never reaches a stage boundary
HARD_LIMIT_GRACE_S = 30


def make_celery(settings: Settings) -> Celery:
    app = Celery("m2fp", broker=settings.broker_url)
    app.conf.update(
        task_default_queue=QUEUE,
        task_ignore_result=True,
        task_acks_late=False,
        worker_prefetch_multiplier=1,  # a worker holds one task: the queue depth stays visible
        task_time_limit=settings.run_timeout_s + HARD_LIMIT_GRACE_S,
        worker_max_memory_per_child=settings.worker_max_memory_mb * 1024,  # KiB
        worker_hijack_root_logger=False,
        broker_connection_retry_on_startup=True,
        broker_transport_options={"socket_timeout": 5, "socket_connect_timeout": 2},
    )
    return app
