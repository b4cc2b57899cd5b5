"""The per-task memory plan: what one task (decode, parse, render) needs for a photo of a
given shape, how many tasks run at once within the budget, and which photos cannot
fit at all (refused at admission from the header, 422 `image_too_large`). Every model
the service loads (`M2FP_MODELS`) is counted: the idle RSS is measured once all of them
are loaded and warmed, and a task is planned at the full-size network's needs whichever
model runs it.

The numbers are measured on the full-size model (README, "Memory budget"): across
aspect ratios from 1:1 to 331:1 at 24 MP the task's peak over the idle process was
0.86-0.92 GB, the worst at 2.08:1, where the network input is largest (1333 x 640);
strips cost no more per pixel than photos. The estimate for 24 MP, 1.27 GB, is 38 %
above the worst (the plan keeps at least 15 %).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from ..errors import ImageTooLarge
from ..settings import Settings

log = logging.getLogger("m2fp.service")

MB = 2**20
# The network at its largest input (1333 x 640; measured up to 0.49 GB over idle for a
# 2 MP photo, in a process that had run other tasks) and the photo-size-independent part
# of post-processing (chunks of M2FP_POSTPROCESS_CHUNK_MB, the network's outputs)
NETWORK_WORKING_BYTES = 520 * MB
# The same for the backend that runs the exported graph (deformable attention by
# `grid_sample`, unchunked): ONNX Runtime's process peaked 0.59-0.67 GB over idle parsing
# 1344 x 640 photos back to back (the largest network input, post-processing ~30 MB;
# 0.49-0.50 GB with the heap trimmed before each), plus ~17 %
EXPORTED_NETWORK_WORKING_BYTES = {"onnxruntime": 800 * MB}
# Per photo pixel: the upload and the decoded photo (Pillow keeps RGB as 4 B), the class
# map, the running best and the class canvas (10 B), one query's full-resolution
# logits, signs and box temporaries (~11 B), rendering (the overlay's full-size copy).
# Where glibc places these varies from run to run: the same 4.8 MP task grew by 18-29.9 B
# a pixel over some seventy runs (the test wants 15 % headroom over the worst; 26.9 came in
# CI on 2026-11-23, over the 30 B this was until then, 28.2 in another CI run that day,
# over the 31 B that followed, and 29.9 in a third, over 33 B; the code at that run gave
# 21.9-25.1 in six local runs, and with session 12's heap settings 21.1-24.2: the spread,
# not a regression).
BYTES_PER_PIXEL = 35


def network_bytes(backend: str) -> int:
    """The network's working memory on `backend` (an M2FP_BACKEND value)."""
    return EXPORTED_NETWORK_WORKING_BYTES.get(backend, NETWORK_WORKING_BYTES)


def task_bytes(pixels: int, backend: str = "exact") -> int:
    """Memory one task needs for a photo of `pixels` (width x height), beyond the idle
    process, whatever its shape: the network's share is taken at its largest input, and
    no shape costs more per pixel than another (measured)."""
    return network_bytes(backend) + BYTES_PER_PIXEL * pixels


@dataclass(frozen=True)
class MemoryPlan:
    slots: int
    task_budget: int  # bytes one task may use: (budget - idle RSS) / slots
    network_bytes: int = NETWORK_WORKING_BYTES  # the backend's (network_bytes)

    @classmethod
    def for_service(cls, settings: Settings, idle_rss: int) -> "MemoryPlan":
        """As many slots as tasks at the largest accepted photo fit the budget (at least
        one), unless `M2FP_SLOTS` sets them."""
        free = max(0, settings.memory_budget_mb * MB - idle_rss)
        slots = settings.slots or max(1, free // task_bytes(settings.max_pixels, settings.backend))
        plan = cls(slots=slots, task_budget=free // slots, network_bytes=network_bytes(settings.backend))
        if plan.max_pixels < settings.max_pixels:
            log.warning("a memory budget of %d MB with %d slot(s) leaves %d MB a task: photos over %d "
                        "pixels will be refused (M2FP_MAX_PIXELS is %d)", settings.memory_budget_mb,
                        slots, plan.task_budget // MB, max(0, plan.max_pixels), settings.max_pixels)
        return plan

    @property
    def max_pixels(self) -> int:
        """The largest photo a task's share of the budget holds."""
        return (self.task_budget - self.network_bytes) // BYTES_PER_PIXEL

    def admit(self, width: int, height: int) -> None:
        """Refuse, before queueing, a photo whose task would not fit its share."""
        need = self.network_bytes + BYTES_PER_PIXEL * width * height
        if need > self.task_budget:
            raise ImageTooLarge(
                f"The image is {width}x{height}: parsing it needs about {need // MB} MB, more than "
                f"the {self.task_budget // MB} MB this service plans for one task; send at most "
                f"{max(0, self.max_pixels)} pixels.")
