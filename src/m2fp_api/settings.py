"""The one settings object of the service and the command line. Every field is an
`M2FP_`-prefixed environment variable (e.g. `M2FP_MODEL`, `M2FP_MAX_PIXELS`); the README's
configuration table lists them. The library reads none of them: the engine's options
(model to jpeg_draft) are `HumanParser.from_pretrained`'s arguments, with the same
defaults, and `HumanParser.from_settings` maps these onto them."""

from __future__ import annotations

import base64
import binascii
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from .engine.backends import BACKENDS
from .engine.checkpoint import HUB_MULTIPLE


class Settings(BaseSettings):
    # a bad value is named, never echoed: it may be a secret (M2FP_WEBHOOK_SECRET, M2FP_API_KEY)
    model_config = SettingsConfigDict(env_prefix="M2FP_", protected_namespaces=(), extra="ignore",
                                      hide_input_in_errors=True)

    # --- model -----------------------------------------------------------------------
    model: str = Field(HUB_MULTIPLE, description=(
        "Hub id, local model directory (configuration.json + pytorch_model.pt), or `demo` "
        "for a seeded random stand-in (reported as pretrained: false)."))
    models: Annotated[list[str], NoDecode] = Field(default_factory=list, description=(
        "Comma list of model references (as `M2FP_MODEL`) to load side by side; a request "
        "picks one with its `model` field, the first is the default. Empty: `M2FP_MODEL` alone."))
    model_revision: str | None = Field(None, description="Hub revision to download.")
    allow_download: bool = Field(True, description=(
        "Fetch hub weights through ModelScope's downloader when they are not cached."))
    cache_dir: Path = Field(Path("~/.cache/m2fp-api").expanduser(), description=(
        "Where generated stand-in and benchmark checkpoints, ONNX exports and compiled "
        "code are kept."))
    threads: int = Field(0, ge=0, description="Torch intra-op threads; 0 = one per core.")
    backend: Literal[BACKENDS] = Field("exact", description=(
        "`exact`: fp32, equal to ModelScope's output, with exact rewrites (folded BN, "
        "channels-last backbone, gathered deformable attention, decoder attention masks "
        "computed at each level's resolution). `fast`: the backbone and the encoder's "
        "feed-forwards in int8 where the CPU has int8 dot products (VNNI/AMX-INT8) and the rest (without int8: everything) under "
        "bf16 autocast where it has native bf16 (exact where it has neither). "
        "`onnxruntime`: the network exported to ONNX (once, kept in the cache directory) "
        "and run by ONNX Runtime in fp32 (`pip install 'm2fp-api[onnx]'`). `reference`: "
        "ModelScope's own formulation, slower; for comparisons."))
    compile: bool = Field(False, description=(
        "Compile the network's heads with torch.compile (inductor) in the background "
        "after start-up, for `exact` and `fast`; inputs run eagerly until compiled code "
        "for their size exists. Off by default: it costs about 0.35 GB of idle and 0.4 GB "
        "of peak memory (measured), which the default memory plan does not allow for. "
        "Needs a C++ compiler; artefacts are kept in the cache directory."))

    # --- input limits ----------------------------------------------------------------
    max_pixels: int = Field(24_000_000, gt=0, description="Largest photo accepted, in pixels.")
    min_side: int = Field(8, gt=0, description="Smallest accepted photo side, in pixels.")
    postprocess_chunk_mb: int = Field(32, gt=0, description=(
        "Memory budget for upsampling masks to full resolution at once."))


    jpeg_draft: bool = Field(True, description=(
        "Decode JPEGs far larger than the network input at a reduced scale (outputs stay at "
        "the original size); saves memory and time, changes the input by resampling only."))

    # --- service -----------------------------------------------------------------------
    host: str = Field("127.0.0.1", description="Address `m2fp serve` listens on.")
    port: int = Field(8000, description="Port `m2fp serve` listens on.")
    memory_budget_mb: int = Field(2048, gt=0, description=(
        "Process memory ceiling the admission control plans for (inference slots are sized "
        "to it when `M2FP_SLOTS=0`)."))
    slots: int = Field(0, ge=0, description="Concurrent inferences; 0 = as many as the budget allows.")
    queue_size: int = Field(16, ge=1, description="Tasks waiting beyond the running ones; more get 503.")
    max_upload_mb: float = Field(20, gt=0, description="Largest request body accepted (413 above).")
    queue_timeout_s: float = Field(300, gt=0, description="A task not started within this fails (`timeout`).")
    run_timeout_s: float = Field(120, gt=0, description="A task running longer fails (`timeout`).")
    drain_timeout_s: float = Field(60, gt=0, description=(
        "On SIGTERM, how long queued and running work may take before it fails (`shutdown`)."))
    result_ttl_s: float = Field(3600, gt=0, description="How long finished tasks and outputs are kept.")
    max_results: int = Field(1000, ge=1, description=(
        "Finished tasks kept at most (least recently used go first); also the most tasks "
        "that may share one unfinished work."))
    max_result_mb: float = Field(256, gt=0, description="Stored output bytes at most (least recently used go first).")
    cors_origins: list[str] = Field(default_factory=list, description=(
        "Origins allowed to call the API from a browser (JSON list, e.g. [\"https://a.example\"])."))
    api_key: str | None = Field(None, description=(
        "One key or a comma list of keys; when set, every path but `open_paths` requires "
        "`Authorization: Bearer KEY` or `X-API-Key: KEY` (checked before the body is read)."))
    open_paths: list[str] = Field(["/", "/static/*", "/healthz", "/readyz"], description=(
        "Paths answered without a key when keys are set (JSON list; `/x/*` opens everything "
        "under /x/). Add \"/metrics\", \"/docs\", \"/openapi.json\" to expose them."))

    # --- connections and uploads (slow or stalled clients) -----------------------------
    max_connections: int = Field(256, ge=1, description=(
        "Open connections at most; past it the idlest one (idle 2 s or more) is closed to make "
        "room, else the newcomer gets 503 `too_many_connections`."))
    max_uploads_mb: float = Field(128, gt=0, description=(
        "Body bytes held at once by requests whose body is arriving (what has arrived, plus "
        "512 KB of read-ahead each); past it a body stalled 2 s or more gives its room up, "
        "else 503 `uploads_busy`."))
    max_header_kb: int = Field(16, gt=0, description=(
        "Largest request line plus headers (431 `headers_too_large` above)."))
    header_timeout_s: float = Field(10, gt=0, description=(
        "The request line and headers must arrive within this (408, then closed)."))
    body_timeout_s: float = Field(15, gt=0, description=(
        "Longest pause while a body streams in, and the grace before `min_upload_kb_s` applies "
        "(408, then closed)."))
    min_upload_kb_s: float = Field(64, gt=0, description=(
        "Slowest average pace a body may arrive at after its grace, in KB/s (408, then closed)."))
    keep_alive_s: float = Field(5, gt=0, description="An idle keep-alive connection is closed after this.")

    # --- scale-out (Celery + Redis) -----------------------------------------------
    broker_url: str | None = Field(None, description=(
        "Redis URL of the Celery broker; when set, work goes to `m2fp worker` processes "
        "instead of the in-process executor."))
    store_url: str | None = Field(None, description=(
        "Redis URL of the task store; defaults to the broker URL in cluster mode."))
    worker_concurrency: int = Field(1, ge=1, description="Worker processes per `m2fp worker` (each loads the model).")
    worker_max_memory_mb: int = Field(1900, gt=0, description=(
        "A worker process past this resident memory is replaced after its task."))
    worker_lost_after_s: float = Field(15, gt=0, description=(
        "A running task whose worker has not signalled for this long fails (`worker_lost`)."))

    # --- webhooks --------------------------------------------------------------------
    webhook_secret: str | None = Field(None, description=(
        "Signs webhook deliveries (Standard Webhooks): `whsec_` and the base64 of 24 to 64 "
        "random bytes. Unset: requests with a `webhook` are refused (400)."))
    webhook_allow: str = Field("", description=(
        "Comma list of CIDRs and host names webhooks may reach although they are not public "
        "(e.g. `10.1.0.0/16,hooks.internal`); everything else but public addresses is refused."))
    webhook_timeout_s: float = Field(10, gt=0, description="One delivery attempt's time limit.")
    webhook_retry_s: float = Field(300, ge=0, description=(
        "How long a delivery is retried (exponential backoff with jitter) before it is given up."))

    @field_validator("webhook_secret")
    @classmethod
    def _webhook_secret(cls, secret: str | None) -> str | None:
        """Refused at start-up rather than at the first delivery."""
        if secret is not None:
            try:
                key = base64.b64decode(secret.removeprefix("whsec_"), validate=True)
            except binascii.Error:
                key = b""
            if not 24 <= len(key) <= 64:
                raise ValueError("must be `whsec_` followed by the base64 of 24 to 64 random bytes")
        return secret

    log_format: Literal["text", "json"] = Field("text", description="`json`: one JSON object a line, with task ids.")
    log_level: str = Field("INFO", description="Python logging level.")

    @field_validator("models", mode="before")
    @classmethod
    def _comma_list(cls, value: object) -> object:
        if isinstance(value, str):
            return [ref.strip() for ref in value.split(",") if ref.strip()]
        return value

    @property
    def model_refs(self) -> list[str]:
        """The models the service loads, the default first, each once."""
        return list(dict.fromkeys(self.models or [self.model]))


@lru_cache
def get_settings() -> Settings:
    return Settings()
