"""`m2fp bench` / `make bench`: latency per stage and memory on a full-size checkpoint.

A seeded random checkpoint of the full-size configuration (ResNet-101, 100 queries)
is generated once into the cache: compute is the same as with trained weights. Each
(backend, photo size) is measured in a fresh process, so that its peak RSS is its own,
with one warm-up run and then `--runs` timed runs; medians (p50) and p95 are reported,
with the ratio to ModelScope's pipeline as measured in `shared/BASELINE.md`.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from PIL import Image

BENCH_SEED = 1234
# ModelScope's own pipeline on this kind of machine (2-core Zen 5), from BASELINE.md:
# size -> (latency p50 in s, peak RSS in GB); idle RSS with the model loaded: 1.17 GB
BASELINE = {"512x512": (2.58, 2.10), "960x540": (4.95, 3.02), "1920x1080": (10.8, 6.57)}
BASELINE_IDLE_GB = 1.17
STAGES = ("decoding", "preprocessing", "inference", "postprocessing")
GB = 1e9


def _photo(width: int, height: int) -> Image.Image:
    """The astronaut photo from the shared folder when it is there, else a synthetic one."""
    from PIL import Image

    root = Path(__file__).resolve().parents[2]
    shared = Path(os.environ.get("M2FP_BENCH_PHOTO", root.parent / "shared" / "images" / "astronaut.png"))
    if shared.is_file():
        return Image.open(shared).convert("RGB").resize((width, height), Image.BICUBIC)
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 / width, y * 255 / height, (x + y) * 127 / (width + height)], -1)
    noise = rng.normal(0, 12, (height, width, 3))
    return Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8))


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def run_child(spec: dict) -> dict:
    """One process, one (backend, size): load, warm up, time `runs` parses."""
    import psutil

    from .engine import HumanParser
    from .engine.memory import release_free_memory

    proc = psutil.Process()
    parser = HumanParser.from_pretrained(spec["model"], backend=spec["backend"])
    parser.warm_up()
    ready_s = time.time() - proc.create_time()
    idle_rss = proc.memory_info().rss
    width, height = spec["size"]
    photo = _photo(width, height)
    parser.parse(photo)  # warm-up at this size
    runs = []
    for _ in range(spec["runs"]):
        # as the service does after each task (outside the timing, as there)
        result = None
        release_free_memory()
        t0 = time.perf_counter()
        result = parser.parse(photo)
        total = (time.perf_counter() - t0) * 1000
        runs.append({**result.timings_ms, "total": total})
    np.save(spec["map_path"], result.class_map)
    return {"backend": parser.info.backend, "dtype": parser.info.dtype,
            "threads": parser.info.threads, "ready_s": ready_s, "idle_rss": idle_rss,
            "peak_rss": _peak_rss_bytes(), "runs": runs, "parts": len(result.parts),
            "persons": len(result.persons)}


def _percentiles(values: list[float]) -> dict:
    return {"p50": float(np.percentile(values, 50)), "p95": float(np.percentile(values, 95))}


def _machine() -> dict:
    from .engine.backends import cpu_name, cpu_simd

    return {"cpu": cpu_name(), "cores": os.cpu_count(), "simd": ",".join(cpu_simd()) or "unknown",
            "python": platform.python_version(),
            "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GB, 1)}


def main(args) -> int:
    if args.child:
        print(json.dumps(run_child(json.loads(args.child))))
        return 0
    from .engine.stand_in import BENCH_CONFIG, bundled_configuration, ensure_stand_in, make_stand_in
    from .settings import Settings

    cache = Settings().cache_dir
    if args.config:
        conf = json.loads(Path(args.config).read_text())
        model_dir = make_stand_in(conf, Path(tempfile.mkdtemp(prefix="m2fp-bench-")), BENCH_SEED)
    else:
        print("preparing the full-size random checkpoint (first time only) ...", file=sys.stderr)
        model_dir = ensure_stand_in(BENCH_CONFIG, cache, BENCH_SEED)
        conf = bundled_configuration(BENCH_CONFIG)
    sizes = [tuple(int(v) for v in s.lower().split("x")) for s in args.sizes.split(",")]
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    work = Path(tempfile.mkdtemp(prefix="m2fp-bench-maps-"))
    rows = []
    for backend in backends:
        for width, height in sizes:
            name = f"{width}x{height}"
            spec = {"model": str(model_dir), "backend": backend, "size": [width, height],
                    "runs": args.runs, "map_path": str(work / f"{backend}-{name}.npy")}
            print(f"measuring {backend} {name} ...", file=sys.stderr)
            proc = subprocess.run([sys.executable, "-m", "m2fp_api.cli", "bench", "--child",
                                   json.dumps(spec)], capture_output=True, text=True)
            if proc.returncode:
                print(proc.stderr[-2000:], file=sys.stderr)
                return 1
            child = json.loads(proc.stdout.strip().splitlines()[-1])
            row = {"requested_backend": backend, "size": name, **{k: child[k] for k in (
                "backend", "dtype", "threads", "ready_s", "idle_rss", "peak_rss", "parts", "persons")}}
            row["stages_ms"] = {s: _percentiles([r[s] for r in child["runs"]]) for s in STAGES}
            row["total_ms"] = _percentiles([r["total"] for r in child["runs"]])
            if name in BASELINE:
                base_s, base_gb = BASELINE[name]
                row["latency_vs_baseline"] = row["total_ms"]["p50"] / 1000 / base_s
                row["peak_rss_vs_baseline"] = row["peak_rss"] / GB / base_gb
            reference = next((r for r in rows if r["requested_backend"] == "reference"
                              and r["size"] == name), None)
            if reference is not None and backend != "reference":
                # the same-run baseline: ModelScope's formulation on this machine, this run
                row["latency_vs_reference"] = row["total_ms"]["p50"] / reference["total_ms"]["p50"]
            exact_map = work / f"exact-{name}.npy"
            if backend != "exact" and exact_map.exists():
                a, b = np.load(exact_map), np.load(spec["map_path"])
                row["agreement_with_exact"] = float((a == b).mean())
            rows.append(row)
    report = {"machine": _machine(), "model": {"config": conf["model"]["backbone"]["depth"],
              "queries": conf["model"]["decoder"]["num_queries"], "dir": str(model_dir)},
              "runs_per_size": args.runs, "baseline_idle_rss_gb": BASELINE_IDLE_GB, "results": rows}
    _print_table(report)
    text = json.dumps(report, indent=2)
    print(text)
    if args.json_path:
        Path(args.json_path).write_text(text)
    return 0


def _print_table(report: dict) -> None:
    m = report["machine"]
    print(f"\nmachine: {m['cpu']}, {m['cores']} cores, {m['memory_gb']} GB, {m['simd']}; "
          f"{report['runs_per_size']} timed runs per row; times in ms, p50 (p95)")
    print("x reference: against ModelScope's formulation measured in this run on this machine; "
          "x BASELINE.md: against ModelScope's pipeline as measured on the baseline machine\n")
    head = ("backend", "size", *STAGES, "total", "x reference", "x BASELINE.md", "peak RSS",
            "x BASELINE.md", "idle RSS", "ready", "agree")
    print(" | ".join(head))
    print(" | ".join("---" for _ in head))
    for r in report["results"]:
        cells = [f"{r['backend']}", r["size"]]
        cells += [f"{r['stages_ms'][s]['p50']:.0f} ({r['stages_ms'][s]['p95']:.0f})" for s in STAGES]
        cells.append(f"{r['total_ms']['p50']:.0f} ({r['total_ms']['p95']:.0f})")
        cells.append(f"{r.get('latency_vs_reference', float('nan')):.2f}")
        cells.append(f"{r.get('latency_vs_baseline', float('nan')):.2f}")
        cells.append(f"{r['peak_rss'] / GB:.2f} GB")
        cells.append(f"{r.get('peak_rss_vs_baseline', float('nan')):.2f}")
        cells.append(f"{r['idle_rss'] / GB:.2f} GB")
        cells.append(f"{r['ready_s']:.1f} s")
        agree = r.get("agreement_with_exact")
        cells.append("-" if agree is None else f"{agree * 100:.2f}%")
        print(" | ".join(cells))
    print()
