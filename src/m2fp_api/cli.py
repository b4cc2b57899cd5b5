"""`m2fp` command line: parse photos, describe the model, benchmark, serve."""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path

from .outputs import OUTPUT_NAMES
from .engine.backends import BACKENDS
from .result_json import MaskFormat

# the key `m2fp parse --server` sends (M2FP_API_KEY is the service's own list of keys)
CLIENT_API_KEY_ENV = "M2FP_CLIENT_API_KEY"


def _parser_from_args(args, **overrides):
    from .engine import HumanParser
    from .settings import Settings

    if args.model:
        overrides["model"] = args.model
    if getattr(args, "backend", None):
        overrides["backend"] = args.backend
    # a command line run is over before a background compile would pay off
    return HumanParser.from_settings(Settings(compile=False, **overrides))


def _requested_outputs(args) -> tuple[str, ...] | None:
    """The `--outputs` asked for, None for what the model writes by default; exits (2)
    naming an unknown one."""
    if args.outputs is None:
        return None
    outputs = tuple(o.strip() for o in args.outputs.split(",") if o.strip())
    unknown = set(outputs) - set(OUTPUT_NAMES)
    if unknown:
        print(f"error: unknown outputs {sorted(unknown)}; choose from {','.join(OUTPUT_NAMES)}",
              file=sys.stderr)
        raise SystemExit(2)
    return outputs


def cmd_parse(args) -> int:
    if args.server:
        return cmd_parse_remote(args)

    from tqdm import tqdm

    from .errors import M2FPError
    from .outputs import output_named, render_outputs
    from .tasks.task import TaskOptions

    parser = _parser_from_args(args)
    if not parser.info.pretrained:
        print(f"note: model {parser.info.id!r} is a stand-in with random weights "
              f"(pretrained: false); its output is not a real parse.", file=sys.stderr)
    outputs = _requested_outputs(args)
    try:  # the service's rules for what a model can write
        options = TaskOptions(outputs, args.alpha, MaskFormat(args.masks)).for_model(parser.info)
    except M2FPError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 2
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    failures = 0
    for photo in tqdm(args.photos, unit="photo", disable=len(args.photos) < 2 or args.quiet):
        try:
            decoded = parser.decode(photo)
            result = parser.parse(decoded)
        except (M2FPError, OSError) as exc:
            failures += 1
            tqdm.write(f"{photo}: {getattr(exc, 'code', 'io_error')}: {getattr(exc, 'message', exc)}",
                       file=sys.stderr)
            continue
        stem = out_dir / Path(photo).stem
        files, _ = render_outputs(result, decoded.image, options.outputs, options.overlay_alpha, parser.info,
                                  options.masks)
        for name, data in files.items():
            Path(f"{stem}.{output_named(name).file_name}").write_bytes(data)
        if not args.quiet and len(args.photos) < 2:
            print(f"{photo}: {len(result.parts)} parts, {len(result.persons)} persons -> {stem}.*")
    return 1 if failures else 0


def cmd_parse_remote(args) -> int:
    from .client import RemoteParse, parse_remote

    if args.backend:
        print("error: --backend chooses how a local model runs; the service runs its own", file=sys.stderr)
        return 2
    # --model names one of the service's models (GET /v1/models), the default without it
    job = RemoteParse(outputs=_requested_outputs(args), overlay_alpha=args.alpha, masks=args.masks,
                      model=args.model, retries=args.retries)
    return parse_remote(args.server.rstrip("/"), args.api_key, args.photos, Path(args.out), job, args.quiet)


def cmd_info(args) -> int:
    import torch

    from .engine.backends import cpu_name
    from .render import label_set

    parser = _parser_from_args(args)
    info = parser.info
    doc = {
        "model": {"id": info.id, "revision": info.revision, "pretrained": info.pretrained,
                  "single_human": info.single_human, "label_set": label_set(info.classes),
                  "classes": list(info.classes),
                  "path": str(parser.source.path)},
        "runtime": {"backend": info.backend, "dtype": info.dtype, "threads": info.threads,
                    "torch": torch.__version__, "python": platform.python_version(),
                    "machine": platform.machine(), "processor": cpu_name()},
    }
    print(json.dumps(doc, indent=2))
    return 0


def cmd_download(args) -> int:
    from .errors import ModelUnavailable
    from .engine.checkpoint import resolve_model
    from .settings import Settings

    settings = Settings()
    try:
        source = resolve_model(args.model_id, revision=args.revision, cache_dir=settings.cache_dir,
                               allow_download=True)
    except ModelUnavailable as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 1
    print(source.path)
    return 0


def cmd_bench(args) -> int:
    from .bench import main as bench_main

    return bench_main(args)


def cmd_export(args) -> int:
    from pydantic import ValidationError

    from .engine.checkpoint import load_network, resolve_model
    from .engine.onnx import export_onnx
    from .engine.optimize import optimize
    from .errors import M2FPError
    from .settings import Settings

    try:
        settings = Settings()
        source = resolve_model(args.model or settings.model, revision=settings.model_revision,
                               cache_dir=settings.cache_dir, allow_download=settings.allow_download)
        path = export_onnx(optimize(load_network(source), "exact"), Path(args.out))
    except (M2FPError, ImportError, ValidationError) as exc:
        print(f"error: {getattr(exc, 'message', exc)}", file=sys.stderr)
        return 1
    print(path)
    return 0


def cmd_serve(args) -> int:
    from .api.app import serve
    from .settings import Settings

    overrides = {k: v for k, v in (("host", args.host), ("port", args.port)) if v}
    if args.model:  # this model alone, whatever M2FP_MODELS lists
        overrides.update(model=args.model, models=[args.model])
    serve(Settings(**overrides))
    return 0


def cmd_worker(args) -> int:
    from .tasks.worker import main as worker_main

    worker_main()
    return 0


def build_arg_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="m2fp", description="Multi-person human parsing (M2FP).")
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("parse", help="parse photos into mask, overlay, labels and parts files")
    p.add_argument("photos", nargs="+")
    p.add_argument("--out", default="out", help="output directory (default: ./out)")
    p.add_argument("--model", help="hub id, model directory or 'demo' (default: M2FP_MODEL); with --server, one of "
                   "the service's models (GET /v1/models; default: its first)")
    p.add_argument("--backend", choices=BACKENDS)
    p.add_argument("--outputs", help="comma list of " + ",".join(OUTPUT_NAMES)
                   + " (default: all the model writes; persons needs a multi-person model)")
    p.add_argument("--masks", choices=[f.value for f in MaskFormat], default=MaskFormat.none.value,
                   help="rle: parts.json carries each part's and person's mask as COCO RLE")
    p.add_argument("--alpha", type=float, default=0.5, help="overlay opacity 0..1")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--server", metavar="URL",
                   help="send the photos to the m2fp service at URL instead of parsing here "
                        "(a re-run answers from the tasks of the first: nothing is parsed twice)")
    p.add_argument("--api-key", default=os.environ.get(CLIENT_API_KEY_ENV),
                   help=f"the service's API key, if it needs one (default: ${CLIENT_API_KEY_ENV})")
    p.add_argument("--retries", type=int, default=10,
                   help="with --server: how often a request refused for a while (503 with "
                        "Retry-After) or cut off is tried again (default: 10)")
    p.set_defaults(func=cmd_parse)

    p = sub.add_parser("info", help="print the model and runtime")
    p.add_argument("--model")
    p.add_argument("--backend", choices=BACKENDS)
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("download", help="fetch hub weights into ModelScope's cache (needs network)")
    p.add_argument("model_id")
    p.add_argument("--revision")
    p.set_defaults(func=cmd_download)

    p = sub.add_parser("export", help="write the network as an ONNX model with a dynamic input size")
    p.add_argument("--format", choices=("onnx",), default="onnx")
    p.add_argument("--model", help="hub id, model directory or 'demo' (default: M2FP_MODEL)")
    p.add_argument("--out", default="m2fp.onnx", help="file to write (default: ./m2fp.onnx)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("serve", help="run the HTTP service and web page (settings: M2FP_*)")
    p.add_argument("--host")
    p.add_argument("--port", type=int)
    p.add_argument("--model", help="serve this model alone (default: M2FP_MODELS, else M2FP_MODEL)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("worker", help="run a Celery worker for cluster mode (needs M2FP_BROKER_URL)")
    p.set_defaults(func=cmd_worker)

    p = sub.add_parser("bench", help="latency and memory on a full-size random checkpoint")
    p.add_argument("--sizes", default="512x512,960x540,1920x1080")
    p.add_argument("--runs", type=int, default=5, help="timed runs per size, after one warm-up")
    p.add_argument("--backends", default=",".join(sorted(BACKENDS, key=lambda b: b != "reference")),
                   help="reference (ModelScope's formulation, the same-run baseline) runs first")
    p.add_argument("--no-compile", action="store_true", help="run exact and fast eagerly")
    p.add_argument("--no-peer", action="store_true", help="skip ModelScope's pipeline even if set up")
    p.add_argument("--json", dest="json_path", help="also write the results here")
    p.add_argument("--config", help="configuration.json to benchmark (default: bundled R101)")
    p.add_argument("--oracle", help="trained stand-in that judges agreement (default: tests/fixtures/oracle)")
    p.add_argument("--child", help=argparse.SUPPRESS)  # internal: one measurement per process
    p.set_defaults(func=cmd_bench)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_arg_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
