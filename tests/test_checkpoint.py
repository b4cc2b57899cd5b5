"""Where weights come from, and what happens when they cannot be had."""

from __future__ import annotations

import inspect
import json
import shutil
import subprocess
import sys
import types
from importlib import metadata

import pytest
import torch

from conftest import PARITY
from m2fp_api import HumanParser
from m2fp_api.engine.checkpoint import HUB_MULTIPLE, HUB_SINGLE, WEIGHTS_FILE, load_network, resolve_model
from m2fp_api.engine.stand_in import bundled_configuration, make_stand_in
from m2fp_api.errors import ModelUnavailable
from m2fp_api.settings import Settings


HINTS = ("M2FP_MODEL=/path/to/dir", "M2FP_MODEL=demo", "m2fp download", "configuration.json")


@pytest.fixture
def empty_caches(tmp_path, monkeypatch):
    monkeypatch.setenv("MODELSCOPE_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setenv("HOME", str(tmp_path))


def test_hub_id_without_cache_or_downloader_says_how_to_provide_weights(tmp_path, monkeypatch,
                                                                        empty_caches):
    # the downloader is not importable (as without the [hub] extra)
    monkeypatch.setitem(sys.modules, "modelscope.hub.snapshot_download", None)
    with pytest.raises(ModelUnavailable) as info:
        resolve_model(HUB_MULTIPLE, cache_dir=tmp_path, allow_download=True)
    assert "not installed" in info.value.message
    assert all(hint in info.value.message for hint in HINTS)


def test_failed_download_says_how_to_provide_weights(tmp_path, monkeypatch, empty_caches):
    """The downloader is replaced by one that fails as it does without network: tests
    never reach a model hub."""
    fake = types.ModuleType("modelscope.hub.snapshot_download")

    def snapshot_download(model_id, revision=None):
        raise ConnectionError("no route to host")

    fake.snapshot_download = snapshot_download
    for parent in ("modelscope", "modelscope.hub"):
        monkeypatch.setitem(sys.modules, parent, types.ModuleType(parent))
    monkeypatch.setitem(sys.modules, "modelscope.hub.snapshot_download", fake)
    with pytest.raises(ModelUnavailable) as info:
        resolve_model(HUB_MULTIPLE, cache_dir=tmp_path, allow_download=True)
    assert "download failed (ConnectionError)" in info.value.message
    assert all(hint in info.value.message for hint in HINTS)


def test_download_can_be_disabled(tmp_path, empty_caches):
    with pytest.raises(ModelUnavailable, match="downloading is disabled"):
        resolve_model(HUB_SINGLE, cache_dir=tmp_path, allow_download=False)


@pytest.mark.parametrize("layout", ["models/{id}", "{id}"])
def test_modelscope_cache_is_used_first(tmp_path, monkeypatch, layout):
    cache = tmp_path / "ms-cache"
    target = cache / layout.format(id=HUB_SINGLE)
    shutil.copytree(PARITY / "tiny-single", target)
    monkeypatch.setenv("MODELSCOPE_CACHE", str(cache))
    source = resolve_model(HUB_SINGLE, cache_dir=tmp_path, allow_download=False)
    assert source.path == target and source.id == HUB_SINGLE
    assert not source.pretrained  # the fixture is marked as a stand-in
    parser = HumanParser.from_pretrained(HUB_SINGLE, allow_download=False, cache_dir=tmp_path)
    assert parser.config.single_human


def test_incomplete_model_dir_is_reported(tmp_path):
    (tmp_path / "configuration.json").write_text("{}")
    with pytest.raises(ModelUnavailable, match=WEIGHTS_FILE):
        resolve_model(str(tmp_path), cache_dir=tmp_path)


def test_weights_that_do_not_fit_the_configuration_are_refused(tmp_path):
    model_dir = tmp_path / "mismatch"
    shutil.copytree(PARITY / "tiny-multiple", model_dir)
    conf = json.loads((model_dir / "configuration.json").read_text())
    conf["model"]["decoder"]["num_queries"] = 7
    (model_dir / "configuration.json").write_text(json.dumps(conf))
    with pytest.raises(ModelUnavailable, match="do not fit"):
        load_network(resolve_model(str(model_dir), cache_dir=tmp_path))


def _copy_with_edited_state(tmp_path, name: str, edit) -> str:
    """The fixture model `name` copied, with `edit(state_dict)` applied to its weights."""
    model_dir = tmp_path / name
    shutil.copytree(PARITY / "tiny-single", model_dir)
    state = torch.load(model_dir / WEIGHTS_FILE, weights_only=True)["model"]
    edit(state)
    torch.save({"model": state}, model_dir / WEIGHTS_FILE)
    return str(model_dir)


def test_missing_and_unexpected_keys_are_refused(tmp_path):
    def edit(state):
        state.pop("sem_seg_head.predictor.query_feat.weight")
        state["sem_seg_head.extra.weight"] = torch.zeros(1)

    model_dir = _copy_with_edited_state(tmp_path, "keys", edit)
    with pytest.raises(ModelUnavailable, match="1 missing.*1 unexpected"):
        load_network(resolve_model(model_dir, cache_dir=tmp_path))


def test_training_only_keys_are_ignored(tmp_path):
    """Mask2Former training checkpoints carry the loss's buffer; ModelScope skips it."""
    model_dir = _copy_with_edited_state(
        tmp_path, "trained", lambda state: state.update({"criterion.empty_weight": torch.ones(21)}))
    load_network(resolve_model(model_dir, cache_dir=tmp_path))


def test_the_library_reads_no_environment(tmp_path, monkeypatch):
    """M2FP_* configure the service and the command line; a library call takes its options
    as arguments only. The service's settings reach it through from_settings."""
    for name, value in {"MODEL": "demo", "BACKEND": "reference", "MAX_PIXELS": "1234", "MIN_SIDE": "99",
                        "JPEG_DRAFT": "false", "POSTPROCESS_CHUNK_MB": "1", "ALLOW_DOWNLOAD": "false",
                        "CACHE_DIR": str(tmp_path / "elsewhere")}.items():
        monkeypatch.setenv(f"M2FP_{name}", value)
    parser = HumanParser.from_pretrained(PARITY / "tiny-single")
    assert parser.source.id == "tiny-single" and parser.backend.level == "exact"
    assert (parser.limits.max_pixels, parser.limits.min_side) == (24_000_000, 8)
    assert parser.jpeg_draft is True and parser.chunk_bytes == 32 * 2**20
    with pytest.raises(ValueError, match="backend"):
        HumanParser.from_pretrained(PARITY / "tiny-single", backend="fastest")

    monkeypatch.setenv("M2FP_MODEL", str(PARITY / "tiny-single"))
    served = HumanParser.from_settings(Settings())
    assert served.backend.level == "reference" and served.limits.max_pixels == 1234
    assert served.jpeg_draft is False and served.chunk_bytes == 2**20


def test_the_library_defaults_are_the_settings_defaults():
    """One set of defaults: a library call and an unconfigured service parse alike."""
    fields = Settings.model_fields
    for name, option in inspect.signature(HumanParser.from_pretrained).parameters.items():
        assert option.default == fields["model_revision" if name == "revision" else name].default, name


def test_demo_stand_in_is_generated_once_and_says_so(tmp_path):
    parser = HumanParser.from_pretrained("demo", cache_dir=tmp_path)
    assert parser.info.id == "demo" and parser.info.pretrained is False
    weights = next(tmp_path.glob(f"*/{WEIGHTS_FILE}"))
    stamp = weights.stat().st_mtime_ns
    again = HumanParser.from_pretrained("demo", cache_dir=tmp_path)
    assert weights.stat().st_mtime_ns == stamp
    out = again(torch.zeros(48, 64, 3, dtype=torch.uint8).numpy() + 100)
    assert set(out) == {"masks", "labels", "scores"}


def test_stand_ins_are_reproducible_from_their_seed(tmp_path):
    conf = bundled_configuration("tiny-single.json")
    a = make_stand_in(conf, tmp_path / "a", seed=5)
    b = make_stand_in(conf, tmp_path / "b", seed=5)
    sa = torch.load(a / WEIGHTS_FILE, weights_only=True)["model"]
    sb = torch.load(b / WEIGHTS_FILE, weights_only=True)["model"]
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_full_size_configuration_builds_the_published_parameter_count():
    from m2fp_api.model import M2FP, M2FPConfig

    cfg = M2FPConfig.from_model_section(bundled_configuration("r101-multiple.json")["model"])
    with torch.device("meta"):
        network = M2FP(cfg)
    # the published 63.2 M counts the whole state dict (BN running statistics included)
    entries = sum(t.numel() for t in network.state_dict().values())
    assert round(entries / 1e6, 1) == 63.2


def test_importing_the_package_does_not_import_modelscope():
    code = "import sys, m2fp_api; from m2fp_api import HumanParser; print('modelscope' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_loading_and_parsing_do_not_import_torch_compiler_machinery():
    """torch._dynamo drags in sympy: ~70 MB of idle memory for nothing at inference."""
    code = (f"import sys; from m2fp_api import HumanParser; "
            f"p = HumanParser.from_pretrained({str(PARITY / 'tiny-multiple')!r}); p.warm_up(); "
            f"print(sorted(m for m in ('sympy', 'torch._dynamo') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_install_pulled_no_cuda_torchvision_or_mmcv():
    installed = {d.metadata["Name"].lower() for d in metadata.distributions()}
    forbidden = {n for n in installed if n.startswith(("nvidia-", "torchvision", "mmcv", "triton"))}
    assert not forbidden, forbidden
    assert "+cpu" in torch.__version__ or not torch.cuda.is_available()
    requires = metadata.requires("m2fp-api") or []
    core = [r for r in requires if "extra ==" not in r]
    assert not any(r.lower().startswith(("torchvision", "mmcv", "modelscope")) for r in core)
