"""ONNX export of the network, and ONNX Runtime running it in fp32 as a backend (`pip
install '.[onnx]'`).

The exported graph is `M2FP.predict`: a normalised input padded to a multiple of 32
(any size: height and width are dynamic) -> class logits and mask logits. Deformable
attention is exported in its `grid_sample` formulation (ONNX `GridSample`): the
gathered one relies on `embedding_bag`, which ONNX lacks. Normalisation and padding
stay in torch, outside the graph, so the same pre- and post-processing serve every
backend.

OpenVINO, which reads the same file, was a backend until 2026-11-23: held to fp32 (its
bf16 attention kernels do not build on AVX512-BF16 CPUs without AMX), it was slower than
eager `exact` (960x540: 2.1 against 1.7 s on a Zen 5) and, planning its memory per input
size, idled at 0.93 GB and peaked at 2.3 GB (1.06 GB even compiled for one static size):
over the service's memory targets, and with the default 2 GB budget the memory plan
refused every photo. The exported model still loads in it.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import subprocess
import sys
import tempfile
from dataclasses import replace
from functools import lru_cache
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from ..errors import ModelUnavailable
from ..model import M2FP, M2FPConfig
from ..model import m2fp
from ..model.m2fp import SIZE_DIVISIBILITY, NetworkOutput, prepare_input
from .checkpoint import WEIGHTS_FILE, ModelSource, load_config

log = logging.getLogger("m2fp.engine")
OPSET = 18
# the example input the graph is traced at; the exported sizes are symbolic multiples of 32
EXAMPLE_SIZE = (640, 864)
MAX_BLOCKS = 2048 // SIZE_DIVISIBILITY
# OrtArenaCfg's arena_extend_strategy: kSameAsRequested (0 is kNextPowerOfTwo)
ARENA_EXTEND_SAME_AS_REQUESTED = 1
PIXEL_MEAN = torch.tensor(m2fp.PIXEL_MEAN).view(1, 3, 1, 1)
PIXEL_STD = torch.tensor(m2fp.PIXEL_STD).view(1, 3, 1, 1)


class _Predict(nn.Module):
    def __init__(self, network: M2FP) -> None:
        super().__init__()
        self.network = network

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.network.predict(x)


def export_onnx(network: M2FP, path: Path) -> Path:
    """Write `network` (fp32, exact) as an ONNX model with a dynamic input size."""
    if network.variant.dtype != torch.float32:
        raise ValueError("export an fp32 network: ONNX Runtime decides its own precision")
    # grid_sample: ONNX has no embedding_bag (nor oneDNN's linear); unchunked: one graph
    # serves every input size
    network.configure(replace(network.variant, gathered_sampling=False, chunked=False,
                              stem_in_pieces=False, onednn_linear=False))
    blocks_h = torch.export.Dim("blocks_h", min=1, max=MAX_BLOCKS)
    blocks_w = torch.export.Dim("blocks_w", min=1, max=MAX_BLOCKS)
    example = torch.zeros(1, 3, *EXAMPLE_SIZE)
    dims = {"x": {2: SIZE_DIVISIBILITY * blocks_h, 3: SIZE_DIVISIBILITY * blocks_w}}
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.inference_mode(False), torch.no_grad():
        program = torch.onnx.export(_Predict(network).eval(), (example,), dynamo=True,
                                    dynamic_shapes=dims, opset_version=OPSET,
                                    input_names=["image"], output_names=["class_logits", "mask_logits"],
                                    verbose=False)
    # a crash mid-write never leaves a half-written model where the cache looks
    with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".tmp", delete=False) as tmp:
        pass
    program.save(tmp.name)
    os.replace(tmp.name, path)
    return path


def _graph_source_digest() -> str:
    """Digest of the code an export is traced from (the network's modules and this file):
    the package's version does not change with every edit of the network."""
    digest = hashlib.sha256()
    for source in sorted(Path(m2fp.__file__).parent.glob("*.py")) + [Path(__file__)]:
        digest.update(source.read_bytes())
    return digest.hexdigest()[:16]


def cached_export_path(cache_dir: Path, weights: Path) -> Path:
    """Where the export of a checkpoint is kept: named by the checkpoint's identity (path,
    size, modification time), the code it is traced from and the exporter's version, so
    a new checkpoint, network code or torch gets a new export."""
    st = weights.stat()
    key = (f"{weights.resolve()}|{st.st_size}|{st.st_mtime_ns}|{_graph_source_digest()}|"
           f"{torch.__version__}|{OPSET}")
    return Path(cache_dir).expanduser() / "onnx" / f"m2fp-{hashlib.sha256(key.encode()).hexdigest()[:16]}.onnx"


class OnnxNetwork:
    """Runs an exported model in ONNX Runtime; called like `M2FP` (images in, a
    NetworkOutput out), so the engine's pre- and post-processing are shared."""

    def __init__(self, path: Path, config: M2FPConfig, threads: int) -> None:
        self.run = _onnxruntime(path, threads)
        self.config = config

    def eval(self) -> "OnnxNetwork":
        return self

    def __call__(self, images: torch.Tensor) -> NetworkOutput:
        x = prepare_input(images, PIXEL_MEAN, PIXEL_STD)
        logits, masks = self.run(np.ascontiguousarray(x.numpy()))
        return NetworkOutput(pred_logits=torch.from_numpy(logits), pred_masks=torch.from_numpy(masks),
                             padded_size=tuple(x.shape[-2:]))


Runner = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]


def _onnxruntime(path: Path, threads: int) -> Runner:
    try:
        import onnxruntime as ort
    except ImportError as exc:  # the optional extra is missing
        raise ModelUnavailable(
            "M2FP_BACKEND=onnxruntime needs ONNX Runtime: pip install 'm2fp-api[onnx]'.") from exc
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    # Activations from an arena that grows by what is asked (not by powers of two) and is
    # given back after each run, each freed as soon as it is dead: ORT's planner otherwise
    # hands dead activations' buffers on to later ones of the same size, and in its
    # breadth-first order (the encoder's products of samples and weights all before their
    # sum, say) it held ~0.65 GB at once at 1152x640 where the graph needs ~0.26 GB live.
    # Without an arena the freed activations went to glibc, whose heap fragmented (no
    # lower peak) or, mapped one by one, faulted in afresh (a parse 2.9 -> 5.3 s). No
    # memory pattern (one block for a run's every activation), and basic graph
    # optimisations only: the extended ones keep reordered copies of the convolution
    # weights (+0.19 GB idle). `make bench` on a Zen 5, 1920x1080: peak 1.28-1.33 -> 0.95-0.96
    # GB, inference 2.2 s as before.
    _register_arena(ort)
    options.add_session_config_entry("session.use_env_allocators", "1")
    options.enable_mem_reuse = False
    options.enable_mem_pattern = False
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    run_options = ort.RunOptions()
    # so idle memory does not keep the largest parse's peak
    run_options.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")
    return lambda x: tuple(session.run(None, {"image": x}, run_options))


@lru_cache(maxsize=1)
def _register_arena(ort) -> None:
    """The process's one CPU arena, which every session (one per model) shares."""
    ort.create_and_register_allocator(
        ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT),
        ort.OrtArenaCfg({"arena_extend_strategy": ARENA_EXTEND_SAME_AS_REQUESTED}))


def onnx_network(source: ModelSource, cache_dir: Path, threads: int) -> OnnxNetwork:
    """The ONNX Runtime twin of a model's (exact) network, exported on first
    use into the cache directory (the export loads the weights strictly, as
    `load_network` does). The runtime alone holds the weights: no torch network is
    loaded here."""
    path = cached_export_path(cache_dir, source.path / WEIGHTS_FILE)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        # processes starting together on one cache (Celery workers) export once, not each
        with path.with_suffix(".lock").open("w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not path.exists():
                log.info("exporting the network to ONNX once, into %s (40 s or more)", path.parent)
                _export_in_child(source.path, path)
    return OnnxNetwork(path, load_config(source), threads)


def _export_in_child(model_dir: Path, path: Path) -> None:
    """`m2fp export` of `model_dir` to `path`, in a child process: the exporter keeps
    ~0.3-0.5 GB of what it traced after it returns, which a serving process would hold
    until it restarts (the full-size model's first start, in the benchmark: idle 1.11 GB
    instead of 0.56 GB)."""
    proc = subprocess.run([sys.executable, "-m", "m2fp_api.cli", "export", "--model", str(model_dir),
                           "--out", str(path)], capture_output=True, text=True)
    if proc.returncode != 0 or not path.is_file():
        why = proc.stderr.strip()[-500:] or f"the exporting process ended with status {proc.returncode}"
        raise ModelUnavailable(f"Exporting the network to ONNX failed: {why}")
