"""`m2fp bench` / `make bench`: latency per stage, memory and fidelity of every backend.

A seeded random checkpoint of the full-size configuration (ResNet-101, 100 queries)
is generated once into the cache: compute is the same as with trained weights. When
ModelScope's own pipeline is set up beside the project (`../shared/peer/setup.sh`), it
is measured in the same run on the same checkpoint and photos, and every backend's
latency is given as a ratio to it; otherwise `reference` (ModelScope's formulation of the
network, in this project) is the same-run baseline. Each (backend, photo size) is
measured in a fresh process, so that its peak RSS is its own, with one warm-up run and
then `--runs` timed runs; medians (p50) and p95 are reported. Compiled heads are waited
for (outside the timings; the compile time is reported).

Fidelity: random weights sit near ties, so every backend's class maps are also compared
with `exact`'s on held-out scenes of the trained fidelity oracle (`m2fp_api.oracle`,
checkpoint in `tests/fixtures/oracle`, or another trained stand-in given by `--oracle`,
such as a full-size one from scripts/train_stand_in.py), next to the agreement on the
bench photos.
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

from .engine.parser import STAGES

if TYPE_CHECKING:
    from PIL import Image

BENCH_SEED = 1234
# ModelScope's own pipeline on this kind of machine (2-core Zen 5), from BASELINE.md:
# size -> latency p50 in s. Used only when the peer is not set up to measure it in the
# same run.
BASELINE_S = {"512x512": 2.58, "960x540": 4.95, "1920x1080": 10.8}
GB = 1e9
ROOT = Path(__file__).resolve().parents[2]
ORACLE_DIR = ROOT / "tests" / "fixtures" / "oracle"
ORACLE_SCENES = 8
PEER_DIR = Path(os.environ.get("M2FP_PEER_DIR", ROOT.parent / "shared" / "peer"))
# what ../shared/peer/setup.sh builds
PEER_PYTHON = Path("/tmp/peervenv/bin/python")
PEER_MODEL = Path("/tmp/m2fp_random")
PEER_PHOTOS = {"512x512": "/tmp/astro_512.jpg", "960x540": "/tmp/astro_540p.jpg",
               "1920x1080": "/tmp/astro_1080p.jpg"}


def peer_ready() -> bool:
    return (PEER_DIR / "bench_peer.py").is_file() and PEER_PYTHON.exists() and (
        PEER_MODEL / "pytorch_model.pt").exists()


def _photo(width: int, height: int) -> Image.Image:
    """The astronaut photo: the peer's JPEG of that size when set up (both sides parse
    the same file), else the shared PNG resized, else a synthetic one."""
    from PIL import Image

    peer_photo = PEER_PHOTOS.get(f"{width}x{height}")
    if peer_ready() and peer_photo and Path(peer_photo).is_file():
        return Image.open(peer_photo).convert("RGB")
    shared = Path(os.environ.get("M2FP_BENCH_PHOTO", ROOT.parent / "shared" / "images" / "astronaut.png"))
    if shared.is_file():
        return Image.open(shared).convert("RGB").resize((width, height), Image.BICUBIC)
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 / width, y * 255 / height, (x + y) * 127 / (width + height)], -1)
    noise = rng.normal(0, 12, (height, width, 3))
    return Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8))


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _load(model: str, backend: str, compile: bool, sizes: list[tuple[int, int]]):
    """A warmed-up parser; a compiling one is waited for, at the network input sizes of
    `sizes` (width, height) only (the service warms every size in the background)."""
    from .engine import HumanParser
    from .engine.compiled import padded
    from .engine.preprocess import network_size
    from .settings import Settings

    # a command, like `m2fp parse`: the M2FP_ settings apply (cache directory, threads...)
    parser = HumanParser.from_settings(Settings(model=model, backend=backend, compile=compile,
                                                allow_download=False))
    if parser.compiler is not None:
        parser.compiler.sizes = list(dict.fromkeys(
            tuple(padded(n) for n in network_size(w, h, parser.config)) for w, h in sizes))
    parser.warm_up()
    return parser


def _rle_ms(result) -> float:
    """What masks=rle adds to a task: every part's and person's mask as COCO RLE."""
    from .coco_rle import encode

    t0 = time.perf_counter()
    for mask in [p.mask for p in result.parts] + [p.mask for p in result.persons]:
        encode(mask, result.height, result.width)
    return (time.perf_counter() - t0) * 1000


def run_child(spec: dict) -> dict:
    """One process, one (backend, size): load, warm up, time `runs` parses, then parse
    the oracle's held-out scenes."""
    import psutil

    from .engine.memory import release_free_memory, release_if_large

    proc = psutil.Process()
    width, height = spec["size"]
    parser = _load(spec["model"], spec["backend"], spec["compile"], [(width, height)])
    ready_s = time.time() - proc.create_time()
    idle_rss = proc.memory_info().rss
    compile_s = None
    if parser.compiler is not None:
        parser.compiler.wait()
        compile_s = parser.compiler.compile_s
        release_free_memory()
        idle_rss = proc.memory_info().rss
    photo = _photo(width, height)
    parser.parse(photo)  # warm-up at this size
    runs = []
    for _ in range(spec["runs"]):
        # back to back, as the service runs queued tasks (outside the timing, as there)
        result = None
        release_if_large(width * height)
        t0 = time.perf_counter()
        result = parser.parse(photo)
        total = (time.perf_counter() - t0) * 1000
        runs.append({**result.timings_ms, "total": total, "rle": _rle_ms(result)})
    peak_rss = _peak_rss_bytes()
    np.save(spec["map_path"], result.class_map)
    info = parser.info
    if spec.get("oracle_path"):
        from . import oracle

        del parser
        release_free_memory()
        scenes = oracle.held_out(ORACLE_SCENES)
        judge = _load(spec["oracle_dir"], spec["backend"], spec["compile"],
                      [scenes[0].image.shape[1::-1]])
        if judge.compiler is not None:
            judge.compiler.wait()
        np.save(spec["oracle_path"], np.stack([judge.parse(s.image).class_map for s in scenes]))
    return {"backend": info.backend, "dtype": info.dtype, "threads": info.threads,
            "ready_s": ready_s, "idle_rss": idle_rss, "peak_rss": peak_rss, "compile_s": compile_s,
            "runs": runs, "parts": len(result.parts), "persons": len(result.persons)}


def run_peer(sizes: list[tuple[int, int]], runs: int) -> dict[str, dict]:
    """ModelScope's pipeline on the same checkpoint and photos, one process per size."""
    rows = {}
    for width, height in sizes:
        name = f"{width}x{height}"
        if name not in PEER_PHOTOS:
            continue
        print(f"measuring ModelScope's pipeline {name} ...", file=sys.stderr)
        # as its users run it: without the huge-page request this package makes on import
        env = {**{k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"},
               "PYTHONPATH": str(PEER_DIR / "shim")}
        proc = subprocess.run([str(PEER_PYTHON), str(PEER_DIR / "bench_peer.py"), str(PEER_MODEL),
                               PEER_PHOTOS[name], "--runs", str(runs + 1)],
                              capture_output=True, text=True, env=env)
        if proc.returncode:
            print(proc.stderr[-2000:], file=sys.stderr)
            continue
        line = json.loads(proc.stdout.strip().splitlines()[-1])
        timed = line["latency_s"][1:]  # the first run is the warm-up, as for ours
        rows[name] = {"total_ms": _percentiles([t * 1000 for t in timed]),
                      "peak_rss": line["peak_rss_mb"] * 2**20, "idle_rss": line["idle_rss_mb"] * 2**20,
                      "ready_s": line["load_s"], "masks": line["n_masks"]}
    return rows


def _percentiles(values: list[float]) -> dict:
    return {"p50": float(np.percentile(values, 50)), "p95": float(np.percentile(values, 95))}


def _machine() -> dict:
    from .engine.backends import cpu_name, cpu_simd

    return {"cpu": cpu_name(), "cores": os.cpu_count(), "simd": ",".join(cpu_simd()) or "unknown",
            "python": platform.python_version(),
            "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GB, 1)}


def _agreement(work: Path, backend: str, kind: str, name: str) -> float | None:
    exact, other = work / f"exact-{kind}-{name}.npy", work / f"{backend}-{kind}-{name}.npy"
    if backend == "exact" or not (exact.exists() and other.exists()):
        return None
    return float((np.load(exact) == np.load(other)).mean())


def main(args) -> int:
    if args.child:
        print(json.dumps(run_child(json.loads(args.child))))
        return 0
    from .engine.stand_in import BENCH_CONFIG, bundled_configuration, ensure_stand_in, make_stand_in
    from .settings import Settings

    cache = Settings().cache_dir
    peer = peer_ready() and not args.config and not args.no_peer
    if args.config:
        conf = json.loads(Path(args.config).read_text())
        model_dir = make_stand_in(conf, Path(tempfile.mkdtemp(prefix="m2fp-bench-")), BENCH_SEED)
    elif peer:  # the peer's own checkpoint: both sides run identical weights
        model_dir, conf = PEER_MODEL, json.loads((PEER_MODEL / "configuration.json").read_text())
    else:
        print("preparing the full-size random checkpoint (first time only) ...", file=sys.stderr)
        model_dir = ensure_stand_in(BENCH_CONFIG, cache, BENCH_SEED)
        conf = bundled_configuration(BENCH_CONFIG)
    if not peer:
        print("ModelScope's pipeline is not set up (../shared/peer/setup.sh): ratios are to "
              "`reference`, measured in this run, and to BASELINE.md's figures", file=sys.stderr)
    sizes = [tuple(int(v) for v in s.lower().split("x")) for s in args.sizes.split(",")]
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    oracle_dir = Path(args.oracle) if args.oracle else ORACLE_DIR
    if args.oracle and not oracle_dir.is_dir():
        raise SystemExit(f"--oracle {args.oracle}: no such model directory")
    oracle = oracle_dir.is_dir()
    work = Path(tempfile.mkdtemp(prefix="m2fp-bench-maps-"))
    peer_rows = run_peer(sizes, args.runs) if peer else {}
    rows = []
    for backend in backends:
        for index, (width, height) in enumerate(sizes):
            name = f"{width}x{height}"
            compile = not args.no_compile and backend in ("exact", "fast")
            spec = {"model": str(model_dir), "backend": backend, "size": [width, height],
                    "runs": args.runs, "compile": compile, "oracle_dir": str(oracle_dir),
                    "map_path": str(work / f"{backend}-photo-{name}.npy"),
                    # the oracle once per backend, in the first size's process
                    "oracle_path": str(work / f"{backend}-oracle-all.npy") if oracle and index == 0 else None}
            print(f"measuring {backend} {name} ...", file=sys.stderr)
            proc = subprocess.run([sys.executable, "-m", "m2fp_api.cli", "bench", "--child",
                                   json.dumps(spec)], capture_output=True, text=True)
            if proc.returncode:
                print(proc.stderr[-2000:], file=sys.stderr)
                return 1
            child = json.loads(proc.stdout.strip().splitlines()[-1])
            row = {"requested_backend": backend, "size": name, "compiled": compile, **{k: child[k] for k in (
                "backend", "dtype", "threads", "ready_s", "idle_rss", "peak_rss", "compile_s", "parts",
                "persons")}}
            row["stages_ms"] = {s: _percentiles([r[s] for r in child["runs"]]) for s in STAGES}
            row["total_ms"] = _percentiles([r["total"] for r in child["runs"]])
            row["rle_ms"] = _percentiles([r["rle"] for r in child["runs"]])
            if name in peer_rows:
                row["latency_vs_modelscope"] = row["total_ms"]["p50"] / peer_rows[name]["total_ms"]["p50"]
                row["peak_rss_vs_modelscope"] = row["peak_rss"] / peer_rows[name]["peak_rss"]
            elif name in BASELINE_S:
                row["latency_vs_baseline_md"] = row["total_ms"]["p50"] / 1000 / BASELINE_S[name]
            reference = next((r for r in rows if r["requested_backend"] == "reference"
                              and r["size"] == name), None)
            if reference is not None and backend != "reference":
                row["latency_vs_reference"] = row["total_ms"]["p50"] / reference["total_ms"]["p50"]
            row["agreement_photo"] = _agreement(work, backend, "photo", name)
            row["agreement_oracle"] = _agreement(work, backend, "oracle", "all")
            rows.append(row)
    report = {"machine": _machine(), "model": {"config": conf["model"]["backbone"]["depth"],
              "queries": conf["model"]["decoder"]["num_queries"], "dir": str(model_dir)},
              "runs_per_size": args.runs, "oracle_scenes": ORACLE_SCENES if oracle else 0,
              "oracle": str(oracle_dir) if oracle else None,
              "modelscope": peer_rows, "results": rows}
    _print_table(report)
    text = json.dumps(report, indent=2)
    print(text)
    if args.json_path:
        Path(args.json_path).write_text(text)
    return 0


def _print_table(report: dict) -> None:
    m = report["machine"]
    print(f"\nmachine: {m['cpu']}, {m['cores']} cores, {m['memory_gb']} GB, {m['simd']}; "
          f"{report['runs_per_size']} timed runs per row after a warm-up; times in ms, p50 (p95)")
    print("RLE: encoding every part's and person's mask for masks=rle (outside total)")
    if report["modelscope"]:
        print("ModelScope's pipeline, same checkpoint and photos, this run: " + ", ".join(
            f"{k} {v['total_ms']['p50']:.0f} ms, peak {v['peak_rss'] / GB:.2f} GB"
            for k, v in report["modelscope"].items()))
        print("x MS: speed-up over it (its latency / ours)")
    else:
        print("x MS: speed-up over ModelScope's pipeline as BASELINE.md measured it (another run)")
    print("x ref: speed-up over `reference` (ModelScope's formulation, this project, this run); "
          f"agree: class-map pixels equal to exact's (oracle: {report['oracle_scenes']} held-out "
          f"scenes of the trained stand-in {report['oracle']})\n")
    head = ("backend", "size", *STAGES, "total", "RLE", "x MS", "x ref", "peak RSS", "idle RSS", "ready",
            "compile", "agree photo", "agree oracle")
    print(" | ".join(head))
    print(" | ".join("---" for _ in head))

    def pct(v):
        return "-" if v is None else f"{v * 100:.2f}%"

    def speedup(v):
        return "-" if not v else f"{1 / v:.2f}"

    for r in report["results"]:
        cells = [r["backend"] + (" +compile" if r["compiled"] else ""), r["size"]]
        cells += [f"{r['stages_ms'][s]['p50']:.0f} ({r['stages_ms'][s]['p95']:.0f})" for s in STAGES]
        cells.append(f"{r['total_ms']['p50']:.0f} ({r['total_ms']['p95']:.0f})")
        cells.append(f"{r['rle_ms']['p50']:.1f} ({r['rle_ms']['p95']:.1f})")
        cells.append(speedup(r.get("latency_vs_modelscope") or r.get("latency_vs_baseline_md")))
        cells.append(speedup(r.get("latency_vs_reference")))
        cells.append(f"{r['peak_rss'] / GB:.2f} GB")
        cells.append(f"{r['idle_rss'] / GB:.2f} GB")
        cells.append(f"{r['ready_s']:.1f} s")
        cells.append("-" if r["compile_s"] is None else f"{r['compile_s']:.0f} s")
        cells += [pct(r["agreement_photo"]), pct(r["agreement_oracle"])]
        print(" | ".join(cells))
    print()
