"""The one settings object. Every field is an `M2FP_`-prefixed environment variable
(e.g. `M2FP_MODEL`, `M2FP_MAX_PIXELS`); the README's configuration table lists them."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

HUB_MULTIPLE = "damo/cv_resnet101_image-multiple-human-parsing"
HUB_SINGLE = "damo/cv_resnet101_image-single-human-parsing"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="M2FP_", protected_namespaces=(), extra="ignore")

    # --- model -----------------------------------------------------------------------
    model: str = Field(HUB_MULTIPLE, description=(
        "Hub id, local model directory (configuration.json + pytorch_model.pt), or `demo` "
        "for a seeded random stand-in (reported as pretrained: false)."))
    model_revision: str | None = Field(None, description="Hub revision to download.")
    allow_download: bool = Field(True, description=(
        "Fetch hub weights through ModelScope's downloader when they are not cached."))
    cache_dir: Path = Field(Path("~/.cache/m2fp-api").expanduser(), description=(
        "Where generated stand-in and benchmark checkpoints are kept."))
    threads: int = Field(0, ge=0, description="Torch intra-op threads; 0 = one per core.")
    backend: Literal["exact", "fast"] = Field("exact", description=(
        "`exact`: fp32, equal to ModelScope's output. `fast`: bf16 autocast where the CPU "
        "supports it (falls back to exact otherwise)."))

    # --- input limits ----------------------------------------------------------------
    max_pixels: int = Field(40_000_000, gt=0, description="Largest photo accepted, in pixels.")
    min_side: int = Field(8, gt=0, description="Smallest accepted photo side, in pixels.")
    postprocess_chunk_mb: int = Field(64, gt=0, description=(
        "Memory budget for upsampling masks to full resolution at once."))


@lru_cache
def get_settings() -> Settings:
    return Settings()
