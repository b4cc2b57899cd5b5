"""The per-task memory plan holds for every shape (issue 11, item 4): what a task
(decode, parse, render every output) really uses grows with the photo no faster than
the plan's bytes per pixel allow, with 15 % headroom, for photos and strips alike.

Measured in fresh processes (the kernel's peak RSS, reset before the task) on the
tiny fixture model at 4.8 MP (and just under 4 MP), with a
1 MB post-processing chunk so that, as at 24 MP with the default chunk, one query is
upsampled at a time. The full-size figures are in the README ("Memory budget").
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import PARITY
from m2fp_api.tasks.memory_plan import BYTES_PER_PIXEL, MB, NETWORK_WORKING_BYTES, MemoryPlan, task_bytes
from m2fp_api.errors import ImageTooLarge, NotLoaded
from m2fp_api.settings import Settings

HEADROOM = 1.15
BASE = (512, 512)
# about 4.8 MP each: a photo, a 4:1 panorama, the most extreme strips the network accepts;
# and a panorama just under 4 MP, where the heap was left to itself until it grew by up to
# 34 B a pixel (engine.memory.FULL_RESOLUTION_MIN_PIXELS)
SHAPES = [(2200, 2200), (4400, 1100), (40000, 121), (121, 40000), (3980, 995)]

TASK = """
import json, re, sys
from m2fp_api.engine import HumanParser
from m2fp_api.engine.memory import release_free_memory
from m2fp_api.outputs import render_outputs
from m2fp_api.tasks.task import TaskOptions


def status(field):
    return int(re.search(field + r":\\s+(\\d+) kB", open("/proc/self/status").read()).group(1)) * 1024


parser = HumanParser.from_pretrained(sys.argv[1], allow_download=False, postprocess_chunk_mb=1)
parser.warm_up()
payload = open(sys.argv[2], "rb").read()
release_free_memory()
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # resets the peak (VmHWM) to the current RSS: the task's own peak follows
idle = status("VmRSS")
decoded = parser.decode(payload)
result = parser.parse(decoded)
options = TaskOptions().for_model(parser.info)
render_outputs(result, decoded.image, options.outputs, options.overlay_alpha, parser.info)
print(json.dumps({"work": status("VmHWM") - idle}))
"""


def photo_png(width: int, height: int, path) -> None:
    """A photo-like PNG: smooth colour fields and a few figures, so that the model finds
    parts of many sizes (a flat image would give it nothing to paste)."""
    import numpy as np
    from PIL import Image

    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    arr = np.stack([x * 255 / width, y * 255 / height, 128 + 100 * np.sin((x + y) / 37)], -1)
    for cx in (0.2, 0.5, 0.8):  # dark ellipses: person-sized blobs
        inside = ((x / width - cx) / 0.12) ** 2 + ((y / height - 0.5) / 0.4) ** 2 < 1
        arr[inside] = (40, 30, 60)
    Image.fromarray(arr.clip(0, 255).astype(np.uint8)).save(path, format="PNG", compress_level=1)


def task_work(tmp_path, width: int, height: int) -> int:
    path = tmp_path / f"{width}x{height}.png"
    photo_png(width, height, path)
    proc = subprocess.run([sys.executable, "-c", TASK, str(PARITY / "tiny-multiple"), str(path)],
                          capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])["work"]


@pytest.fixture(scope="module")
def base_work(tmp_path_factory) -> int:
    # the median of three: one process's heap can come out ~10 MB lighter than the next,
    # which, subtracted from every shape's work, moved the slope by ~1.5 B/px
    return sorted(task_work(tmp_path_factory.mktemp("base"), *BASE) for _ in range(3))[1]


@pytest.mark.parametrize("width, height", SHAPES, ids=[f"{w}x{h}" for w, h in SHAPES])
def test_task_memory_grows_within_the_plans_bytes_per_pixel(tmp_path, base_work, width, height):
    work = task_work(tmp_path, width, height)
    per_pixel = (work - base_work) / (width * height - BASE[0] * BASE[1])
    assert per_pixel * HEADROOM <= BYTES_PER_PIXEL, (per_pixel, work / MB, base_work / MB)
    # the fixed part: the tiny network is far below the full-size one the plan assumes
    assert base_work * HEADROOM <= NETWORK_WORKING_BYTES


def test_plan_sizes_slots_and_refuses_what_a_slot_cannot_hold():
    idle = 500 * MB
    plan = MemoryPlan.for_service(Settings(memory_budget_mb=2048), idle)
    assert plan.slots == 1 and plan.max_pixels >= Settings().max_pixels
    plan.admit(30000, 800)  # the largest accepted photos fit whatever their shape
    plan.admit(4899, 4899)
    big = MemoryPlan.for_service(Settings(memory_budget_mb=8192), idle)
    assert big.slots == (8192 * MB - idle) // task_bytes(Settings().max_pixels) > 1
    # explicit slots beyond the budget: each task's share shrinks, large photos are refused
    crowded = MemoryPlan.for_service(Settings(memory_budget_mb=2048, slots=2), idle)
    crowded.admit(2000, 1500)
    with pytest.raises(ImageTooLarge) as refused:
        crowded.admit(30000, 800)
    assert "30000x800" in refused.value.message and f"{crowded.max_pixels} pixels" in refused.value.message


def test_the_plan_counts_each_backends_network_memory():
    """The exported graph's runtime needs more for the network than torch: the same
    budget holds smaller photos with it, and a budget too small for its network refuses
    every photo (logged at start) rather than promise memory it lacks."""
    idle = 500 * MB
    torch_plan = MemoryPlan.for_service(Settings(memory_budget_mb=2048), idle)
    ort = MemoryPlan.for_service(Settings(memory_budget_mb=2048, backend="onnxruntime"), idle)
    assert ort.network_bytes > torch_plan.network_bytes and ort.max_pixels < torch_plan.max_pixels
    assert task_bytes(10**6, "onnxruntime") - task_bytes(10**6) == ort.network_bytes - NETWORK_WORKING_BYTES
    squeezed = MemoryPlan.for_service(Settings(memory_budget_mb=1024, backend="onnxruntime"), 500 * MB)
    assert squeezed.max_pixels < 0
    with pytest.raises(ImageTooLarge):
        squeezed.admit(640, 480)
    MemoryPlan.for_service(Settings(memory_budget_mb=2048, backend="onnxruntime"), 500 * MB).admit(4000, 3000)


def test_the_plan_counts_every_model_the_service_loads(tmp_path, monkeypatch):
    """With several models (M2FP_MODELS) the idle RSS the slots are sized from is measured
    once every one of them is loaded and warmed, and the service is ready only then."""
    import time

    from m2fp_api.engine import HumanParser
    from m2fp_api.tasks import executor as executor_module
    from m2fp_api.tasks.executor import InProcessExecutor
    from m2fp_api.tasks.store import MemoryStore

    events: list[str] = []
    warm_up = HumanParser.warm_up
    monkeypatch.setattr(HumanParser, "warm_up", lambda self: (warm_up(self), events.append(f"warm {self.info.id}")))
    plan = MemoryPlan.for_service
    monkeypatch.setattr(executor_module.MemoryPlan, "for_service",
                        lambda settings, idle: (events.append("plan"), plan(settings, idle))[1])
    settings = Settings(models=[str(PARITY / "tiny-multiple"), str(PARITY / "tiny-single")],
                        cache_dir=tmp_path, allow_download=False, compile=False)
    executor = InProcessExecutor(MemoryStore(ttl_s=60, max_finished=10, max_output_bytes=MB), settings)
    executor.start()
    end = time.monotonic() + 60
    while time.monotonic() < end:
        try:
            models = executor.models
            break
        except NotLoaded:  # not ready while any model is still loading
            time.sleep(0.05)
    assert [card.info.id for card in models] == ["tiny-multiple", "tiny-single"]
    assert events == ["warm tiny-multiple", "warm tiny-single", "plan"]
    executor.drain(0)
