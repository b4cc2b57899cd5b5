"""Find and load M2FP weights in ModelScope's on-disk layout.

A model is a directory with `configuration.json` and `pytorch_model.pt`
(`{"model": state_dict}`). It comes from, in order: a local directory, ModelScope's
local cache, ModelScope's downloader (imported lazily, only when needed), or, when
asked for explicitly with `demo`, a seeded random stand-in generated on first use.
There is no silent fallback: when nothing works the error says how to provide weights.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import ModelUnavailable
from ..model import M2FP, M2FPConfig

HUB_MULTIPLE = "damo/cv_resnet101_image-multiple-human-parsing"
HUB_SINGLE = "damo/cv_resnet101_image-single-human-parsing"
CONFIG_FILE = "configuration.json"
WEIGHTS_FILE = "pytorch_model.pt"
# our marker in configuration.json for checkpoints with random weights
STAND_IN_KEY = "m2fp_api"
DEMO = "demo"
# keys a hub checkpoint may carry that are not part of the inference network
IGNORED_KEY_PREFIXES = ("criterion.",)
IGNORED_KEYS = ("pixel_mean", "pixel_std")


@dataclass(frozen=True)
class ModelSource:
    id: str
    path: Path
    revision: str | None
    pretrained: bool


def read_configuration(model_dir: Path) -> dict[str, Any]:
    return json.loads((model_dir / CONFIG_FILE).read_text())


def is_stand_in(configuration: dict[str, Any]) -> bool:
    return bool(configuration.get(STAND_IN_KEY, {}).get("stand_in", False))


def is_model_dir(model_dir: Path) -> bool:
    return (model_dir / CONFIG_FILE).is_file() and (model_dir / WEIGHTS_FILE).is_file()


def _modelscope_cache_candidates(model_id: str) -> list[Path]:
    roots = []
    if os.environ.get("MODELSCOPE_CACHE"):
        roots.append(Path(os.environ["MODELSCOPE_CACHE"]))
    roots.append(Path("~/.cache/modelscope/hub").expanduser())
    out = []
    for root in roots:
        # newer ModelScope keeps models under models/, older ones directly under the root
        out += [root / "models" / model_id, root / model_id]
    return out


def resolve_model(spec: str, *, revision: str | None = None, cache_dir: Path,
                  allow_download: bool = True) -> ModelSource:
    """Turn `M2FP_MODEL` (hub id, directory or `demo`) into a local model directory."""
    if spec == DEMO:
        from .stand_in import ensure_demo_model
        path = ensure_demo_model(cache_dir)
        return ModelSource(id=DEMO, path=path, revision=None, pretrained=False)

    local = Path(spec).expanduser()
    if local.is_dir():
        if not is_model_dir(local):
            raise ModelUnavailable(
                f"The model directory {spec!r} needs both {CONFIG_FILE} and {WEIGHTS_FILE}.")
        return ModelSource(id=local.name, path=local, revision=None,
                           pretrained=not is_stand_in(read_configuration(local)))

    for candidate in _modelscope_cache_candidates(spec):
        if is_model_dir(candidate):
            return ModelSource(id=spec, path=candidate, revision=revision,
                               pretrained=not is_stand_in(read_configuration(candidate)))

    why = "downloading is disabled (M2FP_ALLOW_DOWNLOAD=false)"
    if allow_download:
        try:
            from modelscope.hub.snapshot_download import snapshot_download  # lazy: optional
        except ImportError:
            why = "ModelScope's downloader is not installed (pip install 'm2fp-api[hub]')"
        else:
            try:
                path = Path(snapshot_download(spec, revision=revision))
            except Exception as exc:  # network, auth, unknown id: all mean "not available"
                why = f"the download failed ({type(exc).__name__})"
            else:
                if is_model_dir(path):
                    return ModelSource(id=spec, path=path, revision=revision, pretrained=True)
                why = f"the download has no {WEIGHTS_FILE}"
    raise ModelUnavailable(
        f"No weights for {spec!r}: it is not a local directory, not in ModelScope's cache, "
        f"and {why}. Provide them in one of these ways: (1) on a machine with network access, "
        f"`pip install 'm2fp-api[hub]'` and run `m2fp download {spec}`, then copy the model "
        f"directory here; (2) set M2FP_MODEL=/path/to/dir holding {CONFIG_FILE} and "
        f"{WEIGHTS_FILE}; (3) for a stand-in with random weights (not a real model), "
        f"set M2FP_MODEL=demo.")


def _load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    state = checkpoint.get("model", checkpoint) if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict):
        raise ModelUnavailable(f"{WEIGHTS_FILE} does not hold a state dict.")
    return {
        k: v for k, v in state.items()
        if k not in IGNORED_KEYS and not k.startswith(IGNORED_KEY_PREFIXES)
    }


def load_config(source: ModelSource) -> M2FPConfig:
    return M2FPConfig.from_model_section(read_configuration(source.path)["model"])


def load_network(source: ModelSource) -> M2FP:
    """Build the network from the directory's configuration and load its weights strictly."""
    cfg = load_config(source)
    # built on the meta device and given the checkpoint's tensors as they are: no random
    # initialisation to throw away, no second copy of the weights
    with torch.device("meta"):
        network = M2FP(cfg)
    try:
        state = _load_state_dict(source.path / WEIGHTS_FILE)
    except ModelUnavailable:
        raise
    except Exception as exc:
        raise ModelUnavailable(f"{WEIGHTS_FILE} of {source.id!r} could not be read "
                               f"({type(exc).__name__}).") from exc
    try:
        result = network.load_state_dict(state, strict=False, assign=True)
    except RuntimeError as exc:  # a tensor of the wrong shape
        raise ModelUnavailable(
            f"The weights of {source.id!r} do not fit its {CONFIG_FILE}: {str(exc)[:300]}") from exc
    if result.missing_keys or result.unexpected_keys:
        raise ModelUnavailable(
            f"The weights of {source.id!r} do not fit its {CONFIG_FILE}: "
            f"{len(result.missing_keys)} missing (e.g. {result.missing_keys[:3]}), "
            f"{len(result.unexpected_keys)} unexpected (e.g. {result.unexpected_keys[:3]}).")
    network.register_pixel_statistics()
    return network.eval()
