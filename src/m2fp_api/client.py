"""`m2fp parse --server URL`: photos parsed by a running service, written as local parsing
writes them (`<out>/<photo stem>.<file name>` per output).

Every photo is sent with an Idempotency-Key derived from its bytes, the options and the
service's model, so a re-run (after a crash, a timeout, Ctrl-C) answers the tasks of
the first run and nothing is parsed twice. Refusals that say when to come back (503
`queue_full`, `not_ready`, ...) are retried after their Retry-After, a bounded number
of times; so are dropped connections, which the key makes safe.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
from tqdm import tqdm

from .outputs import OUTPUT_NAMES, output_named

# what a refusal that may be retried says; anything else fails the photo
RETRYABLE_CODES = frozenset({"queue_full", "not_ready", "store_unavailable", "uploads_busy",
                             "too_many_connections", "idempotency_key_in_progress"})
MAX_RETRY_AFTER_S = 60  # a longer Retry-After is waited this long at most, then asked again
WAIT_S = 30  # how long a submission waits for its result server-side before the client polls
POLL_INTERVAL_S = 0.25


class ServiceError(Exception):
    """The service refused or failed a request; `code` as in its error body."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code, self.message = code, message


@dataclass(frozen=True)
class RemoteParse:
    """The options of one `m2fp parse --server` run."""

    outputs: tuple[str, ...] | None  # None: what the model writes by default
    overlay_alpha: float
    masks: str
    model: str | None  # None: the service's default model
    retries: int

    def idempotency_key(self, payload: bytes, model_id: str) -> str:
        """The same photo, options and model give the same key, run after run."""
        digest = hashlib.sha256(payload)
        outputs = None if self.outputs is None else sorted(self.outputs)
        digest.update(json.dumps([outputs, self.overlay_alpha, self.masks, model_id]).encode())
        return digest.hexdigest()

    def form(self) -> dict[str, str]:
        fields = {"overlay_alpha": str(self.overlay_alpha), "masks": self.masks, "wait": str(WAIT_S)}
        if self.outputs is not None:
            fields["outputs"] = ",".join(self.outputs)
        if self.model is not None:
            fields["model"] = self.model
        return fields


class Client:
    def __init__(self, url: str, api_key: str | None, retries: int) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.Client(base_url=url, headers=headers, timeout=WAIT_S + 30)
        self.retries = retries

    def close(self) -> None:
        self.http.close()

    def request(self, method: str, path: str, **kwargs) -> httpx.Response:
        """The answer, after retrying refusals that say when to come back (Retry-After) and
        dropped connections; ServiceError when it is an error or the retries are spent."""
        attempt = 0
        while True:
            try:
                response = self.http.request(method, path, **kwargs)
            except httpx.TransportError as exc:
                if attempt >= self.retries:
                    raise ServiceError("unreachable", f"{self.http.base_url}: {exc}") from None
                delay = min(2 ** attempt, MAX_RETRY_AFTER_S)
            else:
                if response.is_success:
                    return response
                error = _error_of(response)
                if attempt >= self.retries or error.code not in RETRYABLE_CODES:
                    raise error
                delay = min(float(response.headers.get("Retry-After", 1)), MAX_RETRY_AFTER_S)
            attempt += 1
            time.sleep(delay)

    def model(self) -> dict:
        return self.request("GET", "/v1/model").json()

    def parse(self, payload: bytes, name: str, job: RemoteParse, model_id: str) -> dict:
        """The finished task of this photo (submitted, or the one an earlier run submitted)."""
        task = self.request(
            "POST", "/v1/parse",
            files={"file": (name, payload, "application/octet-stream")},
            data=job.form(),
            headers={"Idempotency-Key": job.idempotency_key(payload, model_id)}).json()
        while task["status"] in ("queued", "running"):
            time.sleep(POLL_INTERVAL_S)
            task = self.request("GET", task["links"]["self"]).json()
        if task["status"] != "succeeded":
            error = task.get("error") or {"code": task["status"], "message": f"The task was {task['status']}."}
            raise ServiceError(error["code"], error["message"])
        return task

    def outputs(self, task: dict, names: tuple[str, ...] | None) -> dict[str, bytes]:
        """The outputs asked for, or (None) every one the task has."""
        if names is None:
            names = tuple(name for name in OUTPUT_NAMES if task["links"].get(name))
        return {name: self.request("GET", task["links"][name]).content for name in names}


def _error_of(response: httpx.Response) -> ServiceError:
    try:
        error = response.json()["error"]
        return ServiceError(error["code"], error["message"])
    except (ValueError, KeyError, TypeError):
        return ServiceError(f"http_{response.status_code}", response.text[:200])


def parse_remote(url: str, api_key: str | None, photos: list[str], out_dir: Path, job: RemoteParse,
                 quiet: bool) -> int:
    """Local `m2fp parse`, with the parsing done by the service at `url`. 0 when every photo
    was parsed, 1 otherwise."""
    client = Client(url, api_key, job.retries)
    try:
        try:
            model = client.model()
        except ServiceError as exc:
            print(f"error: {url}: {exc}", file=sys.stderr)
            return 1
        if not model["pretrained"]:
            print(f"note: model {model['id']!r} is a stand-in with random weights "
                  f"(pretrained: false); its output is not a real parse.", file=sys.stderr)
        out_dir.mkdir(parents=True, exist_ok=True)
        failures = 0
        for photo in tqdm(photos, unit="photo", disable=len(photos) < 2 or quiet):
            try:
                payload = Path(photo).read_bytes()
                task = client.parse(payload, Path(photo).name, job, job.model or model["id"])
                files = client.outputs(task, job.outputs)
            except OSError as exc:
                failures += 1
                tqdm.write(f"{photo}: io_error: {exc}", file=sys.stderr)
                continue
            except ServiceError as exc:
                failures += 1
                tqdm.write(f"{photo}: {exc.code}: {exc.message}", file=sys.stderr)
                continue
            stem = out_dir / Path(photo).stem
            for name, data in files.items():
                Path(f"{stem}.{output_named(name).file_name}").write_bytes(data)
            if not quiet and len(photos) < 2:
                result = task["result"]
                print(f"{photo}: {len(result['parts'])} parts, {len(result['persons'])} persons -> {stem}.*")
        return 1 if failures else 0
    finally:
        client.close()
