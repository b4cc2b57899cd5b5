"""Deliveries, from the API process that accepted the task: it watches the task in the
store (whichever process or worker runs it) and, when the task reaches an event asked
for, POSTs the task's JSON on a pool of its own, so a receiver never slows or fails the
task. Each event's delivery is retried with exponential backoff and jitter until it is
answered 2xx or `M2FP_WEBHOOK_RETRY_S` has passed; every attempt is recorded on the
task's handle. Deliveries still pending when this process exits are lost.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Callable

import httpx
import standardwebhooks
from tenacity import (RetryError, Retrying, retry_if_exception_type, stop_after_delay, stop_when_event_set,
                      wait_random_exponential)

from ..errors import BadRequest, StoreUnavailable, WebhookRefused
from ..settings import Settings
from ..tasks.store import TaskStore
from ..tasks.task import Holding, TaskStatus
from .policy import AddressPolicy
from .subscription import Delivery, Subscription

log = logging.getLogger("m2fp.webhooks")

WATCH_INTERVAL_S = 0.1
DELIVERY_THREADS = 4
BACKOFF_FIRST_S, BACKOFF_MAX_S = 0.5, 60.0


class DeliveryFailed(Exception):
    """An attempt that may succeed later: no answer, or an answer other than 2xx."""


def missed(event: str, held: Holding) -> bool:
    """A task cancelled (or failed) before it ran never starts."""
    return event == "started" and held.work.status.terminal and held.work.started_at is None


def reached(event: str, held: Holding) -> bool:
    return held.work.started_at is not None if event == "started" else held.work.status.terminal


def pinned_post(client: httpx.Client, url: str, address, body: bytes, headers: dict[str, str],
                timeout_s: float) -> httpx.Response:
    """POST to `url` through a connection to `address`, the one the policy checked: the
    request keeps the URL's Host and, over TLS, its server name (SNI and the certificate
    check)."""
    original = httpx.URL(url)
    target = original.copy_with(host=str(address))
    headers = {**headers, "Host": original.netloc.decode("ascii")}
    extensions = {"sni_hostname": original.host} if original.scheme == "https" else {}
    return client.post(target, content=body, headers=headers, extensions=extensions, timeout=timeout_s)


@dataclass
class _Watch:
    handle_id: str
    subscription: Subscription
    running: Future | None = None


class WebhookDispatcher:
    def __init__(self, settings: Settings, store: TaskStore) -> None:
        self.store = store
        self.policy = AddressPolicy.parse(settings.webhook_allow)
        self.timeout_s = settings.webhook_timeout_s
        self.retry_s = settings.webhook_retry_s
        self.signer = standardwebhooks.Webhook(settings.webhook_secret) if settings.webhook_secret else None
        # the task's JSON as GET /v1/tasks/{id} answers it (set by the HTTP layer, which owns that shape)
        self.describe: Callable[[Holding], str] | None = None
        self._watches: dict[str, _Watch] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._giving_up = threading.Event()  # set on stop: no more retries
        self._pool = ThreadPoolExecutor(DELIVERY_THREADS, thread_name_prefix="m2fp-webhook")
        # no proxy from the environment: it would connect elsewhere than the checked address
        self._client = httpx.Client(trust_env=False, follow_redirects=False)

    # -- submission -------------------------------------------------------------------
    def check(self, subscription: Subscription) -> None:
        """At submission: webhooks are configured and the URL leads where they may go
        (BadRequest, WebhookRefused). Resolves the host: call it off the event loop."""
        if self.signer is None:
            raise BadRequest("Webhooks are not enabled on this service (M2FP_WEBHOOK_SECRET is not set).")
        self.policy.addresses(subscription.url)

    def watch(self, handle_id: str, subscription: Subscription) -> None:
        with self._lock:
            self._watches[handle_id] = _Watch(handle_id, subscription)

    # -- lifecycle --------------------------------------------------------------------
    def start(self) -> None:
        threading.Thread(target=self._watch_loop, name="m2fp-webhooks", daemon=True).start()

    def stop(self, grace_s: float) -> None:
        """Make the first attempt at what is due within `grace_s` (retries give up), then
        deliver no more: the events of tasks that ended while the service drained still go."""
        self._giving_up.set()
        end = time.monotonic() + grace_s
        while time.monotonic() < end and self._busy():
            time.sleep(WATCH_INTERVAL_S)
        self._stop.set()
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _busy(self) -> bool:
        with self._lock:
            watches = list(self._watches.values())
        for watch in watches:
            if watch.running is not None and not watch.running.done():
                return True
            try:
                pending, held = self._next(watch)
            except StoreUnavailable:
                return False  # nothing can be recorded either: stop now
            if held is not None and reached(pending.event, held):
                return True
        return False

    def _watch_loop(self) -> None:
        while not self._stop.wait(WATCH_INTERVAL_S):
            with self._lock:
                idle = [w for w in self._watches.values() if w.running is None or w.running.done()]
            for watch in idle:
                try:
                    self._advance(watch)
                except StoreUnavailable:
                    pass  # Redis is away for a moment: look again next time
                except Exception:
                    log.warning("watching a task for its webhook failed", exc_info=True)

    def _advance(self, watch: _Watch) -> None:
        """Deliver the next event the task has reached (one at a time, in order); stop
        watching when all are delivered or given up, or the task is gone."""
        pending, held = self._next(watch)
        if held is None:
            with self._lock:
                del self._watches[watch.handle_id]
        elif reached(pending.event, held):
            watch.running = self._pool.submit(self._deliver, watch, pending, self.describe(held).encode())

    def _next(self, watch: _Watch) -> tuple[Delivery | None, Holding | None]:
        """The first event not attempted yet that the task may still reach, and the task
        now; neither when there is no such event or the task is gone (expired, deleted)."""
        if all(d.attempts for d in watch.subscription.deliveries):
            return None, None
        held = self.store.lookup(watch.handle_id)
        if held is None:
            return None, None
        pending = next((d for d in watch.subscription.deliveries if d.attempts == 0 and not missed(d.event, held)), None)
        return (pending, held) if pending else (None, None)

    # -- delivery ---------------------------------------------------------------------
    def _deliver(self, watch: _Watch, delivery: Delivery, body: bytes) -> None:
        msg_id = f"msg_{watch.handle_id}_{delivery.event}"  # the same on every attempt: receivers de-duplicate by it
        try:
            # a stopping service gives up between attempts rather than wait out the retry time
            for attempt in Retrying(stop=stop_after_delay(self.retry_s) | stop_when_event_set(self._giving_up),
                                    wait=wait_random_exponential(multiplier=BACKOFF_FIRST_S, max=BACKOFF_MAX_S),
                                    sleep=self._giving_up.wait, retry=retry_if_exception_type(DeliveryFailed)):
                with attempt:
                    self._attempt(watch, delivery, msg_id, body)
        except RetryError:
            log.warning("webhook %s for task %s given up after %d attempts", delivery.event,
                        watch.handle_id, delivery.attempts, extra={"task_id": watch.handle_id})
        except WebhookRefused as exc:
            log.warning("webhook %s for task %s refused: %s", delivery.event, watch.handle_id, exc.message,
                        extra={"task_id": watch.handle_id})

    def _attempt(self, watch: _Watch, delivery: Delivery, msg_id: str, body: bytes) -> None:
        delivery.attempts += 1
        delivery.last_attempt_at = time.time()
        delivery.status_code = delivery.error = None
        try:
            address = self.policy.addresses(watch.subscription.url)[0]  # resolved once, per attempt
            now = datetime.now(tz=timezone.utc)
            headers = {"Content-Type": "application/json", "webhook-id": msg_id,
                       "webhook-timestamp": str(int(now.timestamp())),
                       "webhook-signature": self.signer.sign(msg_id, now, body.decode())}
            answer = pinned_post(self._client, watch.subscription.url, address, body, headers, self.timeout_s)
            delivery.status_code = answer.status_code
            delivery.delivered = answer.is_success
            if not delivery.delivered:
                raise DeliveryFailed(f"answered {answer.status_code}")
        except WebhookRefused as exc:
            delivery.error = exc.message
            raise
        except httpx.HTTPError as exc:
            delivery.error = f"{type(exc).__name__}: {exc}"[:300]
            raise DeliveryFailed(delivery.error) from None
        finally:
            self._record(watch)

    def _record(self, watch: _Watch) -> None:
        try:
            self.store.put_webhook(watch.handle_id, watch.subscription)
        except StoreUnavailable:
            log.warning("recording a webhook delivery failed: the store is away", extra={"task_id": watch.handle_id})
