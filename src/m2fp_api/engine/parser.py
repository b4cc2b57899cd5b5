"""HumanParser: the engine's public face.

    parser = HumanParser.from_pretrained("damo/cv_resnet101_image-multiple-human-parsing")
    out = parser("photo.jpg")          # ModelScope's dict: masks, labels, scores
    result = parser.parse("photo.jpg")  # ParseResult: class map, parts, persons
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import torch

from ..model import M2FP, M2FPConfig
from .backends import BACKENDS, Backend, configure_threads, select_backend
from .checkpoint import HUB_MULTIPLE, ModelSource, load_network, resolve_model
from .images import DecodedImage, ImageInput, ImageLimits, decode_image
from .memory import full_resolution_heap, release_free_memory, release_if_large, settle_heap
from .compiled import CompiledHeads, input_sizes
from .onnx import onnx_network
from .optimize import optimize
from .postprocess import DEFAULT_CHUNK_BYTES, parse_multiple, parse_single
from .preprocess import DRAFT_MIN_SIDE, prepare
from .result import ParseResult

if TYPE_CHECKING:
    from ..settings import Settings

# Called when a stage starts, with the stage name and the overall progress (0..1).
# It may raise to abandon the work (the service's cancellation and time limits do).
StageCallback = Callable[[str, float], None]

STAGES = ("decoding", "preprocessing", "inference", "postprocessing")
# rough share of the total time spent before each stage starts, for progress bars
STAGE_PROGRESS = {"decoding": 0.0, "preprocessing": 0.05, "inference": 0.1, "postprocessing": 0.85}


@dataclass(frozen=True)
class ModelInfo:
    id: str
    revision: str | None
    classes: tuple[str, ...]
    pretrained: bool
    backend: str
    dtype: str
    threads: int
    single_human: bool


class HumanParser:
    def __init__(self, network: M2FP, source: ModelSource, backend: Backend, *,
                 limits: ImageLimits = ImageLimits(), chunk_bytes: int = DEFAULT_CHUNK_BYTES,
                 jpeg_draft: bool = False, compiler: CompiledHeads | None = None) -> None:
        self.network = network.eval()
        self.compiler = compiler
        self.jpeg_draft = jpeg_draft
        self.source = source
        self.backend = backend
        self.limits = limits
        self.chunk_bytes = chunk_bytes

    # --- construction ---------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, model: str | Path = HUB_MULTIPLE, *, revision: str | None = None,
                        allow_download: bool = True,
                        cache_dir: str | Path = Path("~/.cache/m2fp-api").expanduser(),
                        threads: int = 0, backend: str = "exact", compile: bool = False,
                        max_pixels: int = 24_000_000, min_side: int = 8, postprocess_chunk_mb: int = 32,
                        jpeg_draft: bool = True) -> "HumanParser":
        """Load a hub id, a local model directory, or `demo`.

        Reads no environment: the options are these arguments, whose defaults are the
        service's (the README's configuration table says what each does). Background
        compilation is the service's: a library call asks for it (`compile=True`)."""
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, not {backend!r}")
        cache_dir = Path(cache_dir)
        source = resolve_model(str(model), revision=revision, cache_dir=cache_dir,
                               allow_download=allow_download)
        threads = configure_threads(threads)
        selected = select_backend(backend, threads)
        compiler = None
        if selected.level == "onnx":
            network = onnx_network(source, cache_dir, threads)
        else:
            network = optimize(load_network(source), selected.level, int8=selected.int8)
        if compile and selected.level not in ("onnx", "reference"):
            compiler = CompiledHeads(network, input_sizes(network.config), cache_dir)
        return cls(network, source, selected, compiler=compiler,
                   limits=ImageLimits(max_pixels=max_pixels, min_side=min_side),
                   chunk_bytes=postprocess_chunk_mb * 2**20, jpeg_draft=jpeg_draft)

    @classmethod
    def from_settings(cls, settings: Settings, model: str | None = None) -> "HumanParser":
        """The parser the service's settings describe, for `model` (one of
        `settings.model_refs`; default `settings.model`): the one place they become the
        library's options."""
        return cls.from_pretrained(
            model or settings.model, revision=settings.model_revision, allow_download=settings.allow_download,
            cache_dir=settings.cache_dir, threads=settings.threads, backend=settings.backend,
            compile=settings.compile, max_pixels=settings.max_pixels, min_side=settings.min_side,
            postprocess_chunk_mb=settings.postprocess_chunk_mb, jpeg_draft=settings.jpeg_draft)

    # --- facts ----------------------------------------------------------------------
    @property
    def config(self) -> M2FPConfig:
        return self.network.config

    @property
    def info(self) -> ModelInfo:
        return ModelInfo(id=self.source.id, revision=self.source.revision,
                         classes=self.config.part_classes, pretrained=self.source.pretrained,
                         backend=self.backend.name, dtype=self.backend.dtype,
                         threads=self.backend.threads, single_human=self.config.single_human)

    # --- work -----------------------------------------------------------------------
    def decode(self, image: ImageInput) -> DecodedImage:
        return decode_image(image, self.limits, DRAFT_MIN_SIDE if self.jpeg_draft else None)

    def parse(self, image: ImageInput | DecodedImage, on_stage: StageCallback | None = None) -> ParseResult:
        timings: dict[str, float] = {}
        current, started = None, 0.0

        def stage(name: str | None) -> None:
            """Close the running stage's timing and start the next (None: finished)."""
            nonlocal current, started
            now = time.perf_counter()
            if current is not None:
                timings[current] = (now - started) * 1000
            current, started = name, now
            if name is not None and on_stage is not None:
                on_stage(name, STAGE_PROGRESS[name])

        stage("decoding")
        decoded = image if isinstance(image, DecodedImage) else self.decode(image)
        stage("preprocessing")
        timings["decoding"] = decoded.decode_ms
        inp = prepare(decoded.image, self.config, decoded.original_size)
        stage("inference")
        with torch.inference_mode():
            out = self.network(inp.tensor[None])
        pixels = inp.output_size[0] * inp.output_size[1]
        release_if_large(pixels)  # the network's freed activations, before the full-size maps
        stage("postprocessing")
        with torch.inference_mode(), full_resolution_heap(pixels):
            if self.config.single_human:
                result = parse_single(out, inp, self.config, self.chunk_bytes)
            else:
                result = parse_multiple(out, inp, self.config, self.chunk_bytes, bf16=self.backend.bf16)
        stage(None)
        result.timings_ms = timings
        return result

    def __call__(self, image: ImageInput) -> dict:
        """ModelScope-compatible output: {"masks": [...], "labels": [...], "scores": [...]}."""
        return self.parse(image).to_modelscope()

    def warm_up(self) -> None:
        """Run the whole pipeline once on a small input so the first real request does not
        pay for lazy initialisation (thread pools, kernels, allocator). The network is fed
        a 128 px input directly: a photo would be resized to 640 px, a full inference."""
        with torch.inference_mode():
            self.network(torch.full((1, 3, 128, 128), 128.0))
        release_free_memory()
        if self.backend.settles_heap:
            settle_heap()
        if self.compiler is not None:  # after the warm-up: compiling never delays readiness
            self.compiler.start()
