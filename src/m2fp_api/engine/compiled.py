"""The network's heads (pixel decoder and transformer decoder) compiled by inductor.

Compiling takes a minute or more of CPU, so it never stands in the way: it runs in a
background thread after the model is ready, and until a compiled graph exists for an
input's size, that input runs eagerly. The graph is compiled with dynamic height and
width, then run once at every network input size the pre-processing can produce
(padded to 32: 83 for the multiple-human model, one for the single-human model), so no
request ever waits for a compile. Inductor's artefacts are kept on disk (`cache_dir`), which
makes a restart's compile a matter of seconds.

Anything that goes wrong while compiling leaves the eager heads in charge, and says so
in the log; the results are the same either way up to float rounding (checked by the
tests against the parity tolerances). With compilation on, the heads run unchunked
(`InferenceVariant.chunked`), eager or compiled.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable, Iterable

import torch

from ..model import M2FP, M2FPConfig
from ..model.m2fp import SIZE_DIVISIBILITY
from .preprocess import LONG_SIDE_MAX, SHORT_SIDE

log = logging.getLogger("m2fp.engine")
Size = tuple[int, int]


def padded(n: int) -> int:
    return -(-n // SIZE_DIVISIBILITY) * SIZE_DIVISIBILITY


def input_sizes(cfg: M2FPConfig) -> list[Size]:
    """The padded network input sizes a model of this configuration is fed."""
    if cfg.single_human:
        width, height = cfg.single_human_size
        return [(padded(height), padded(width))]
    return multiple_human_sizes()


def multiple_human_sizes() -> list[Size]:
    """Every padded network input of the multiple-human pre-processing, most common
    first: short side 640 with the long side up to 1333, then, past an aspect ratio of
    1333:640, long side 1333 with a shorter short side."""
    longest = padded(LONG_SIDE_MAX)
    common = [padded(round(SHORT_SIDE * r)) for r in (16 / 9, 4 / 3, 1.0, 3 / 2)]
    longs = common + list(range(SHORT_SIDE, longest + 1, SIZE_DIVISIBILITY))
    sizes: list[Size] = []
    for n in longs:
        sizes += [(SHORT_SIDE, n), (n, SHORT_SIDE)]
    for short in range(SHORT_SIDE - SIZE_DIVISIBILITY, 0, -SIZE_DIVISIBILITY):
        sizes += [(short, longest), (longest, short)]
    return list(dict.fromkeys(sizes))


class CompiledHeads:
    """Swaps a compiled twin of `network.sem_seg_head` in for the sizes it is ready for."""

    def __init__(self, network: M2FP, sizes: Iterable[Size], cache_dir: Path) -> None:
        self.network = network
        self.sizes = list(sizes)
        self.ready: set[Size] = set()
        self.failed: str | None = None
        self.compile_s: float | None = None
        self._done = threading.Event()
        self._started = False
        # inductor reads its cache location from the environment when it compiles
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(Path(cache_dir).expanduser() / "inductor")
        self._eager = network.sem_seg_head
        self._compiled: Callable | None = None
        # one graph for every size: chunk counts that follow the input size would each
        # be a recompile (inductor's fusion keeps the unchunked temporaries in check)
        network.configure(replace(network.variant, chunked=False, heads=self._run))

    # --- request path -----------------------------------------------------------------
    def _run(self, features: dict[str, torch.Tensor]):
        size = self._input_size(features)
        if self._compiled is not None and size in self.ready:
            return self._compiled(features)
        return self._eager(features)

    def _input_size(self, features: dict[str, torch.Tensor]) -> Size:
        name, level = next(iter(features.items()))
        stride = self.network.backbone.strides[name]
        return level.shape[-2] * stride, level.shape[-1] * stride

    # --- background ---------------------------------------------------------------------
    def start(self) -> threading.Thread:
        self._started = True
        thread = threading.Thread(target=self._compile_all, name="m2fp-compile", daemon=True)
        thread.start()
        return thread

    def wait(self, timeout: float | None = None) -> bool:
        return self._done.wait(timeout)

    @property
    def running(self) -> bool:
        """Compiling in the background now (the process must not finalise under it)."""
        return self._started and not self._done.is_set()

    def _compile_all(self) -> None:
        started = time.perf_counter()
        try:
            compiled = torch.compile(self._eager, dynamic=True)
            for size in self.sizes:
                self._warm(compiled, size)
                if self._compiled is None:
                    self._compiled = compiled
                    log.info("heads compiled in %.0f s; warming the other input sizes",
                             time.perf_counter() - started)
                self.ready.add(size)
            self.compile_s = time.perf_counter() - started
            log.info("compiled heads ready for %d input sizes (%.0f s)", len(self.ready), self.compile_s)
        except Exception as exc:  # noqa: BLE001 - a failed compile leaves eager in charge
            self.failed = f"{type(exc).__name__}: {str(exc)[:300]}"
            log.warning("compiling the heads failed, running them eagerly: %s", self.failed)
        finally:
            self._done.set()

    def _warm(self, compiled: Callable, size: Size) -> None:
        """Run the compiled heads once on backbone-shaped zeros of an input of `size`,
        in the numeric mode of requests (the dtype is part of what a graph is for)."""
        backbone = self.network.backbone
        dtype = self.network.variant.dtype
        features = {name: torch.zeros(1, backbone.channels[name], size[0] // backbone.strides[name],
                                      size[1] // backbone.strides[name], dtype=dtype)
                    for name in backbone.out_features}
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            compiled(features)
