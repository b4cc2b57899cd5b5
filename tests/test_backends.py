"""Every non-exact backend judged against `exact`: on the trained fidelity oracle
(tests/fixtures/oracle, a stand-in trained on `m2fp_api.oracle`'s scenes: random weights
sit near ties and would exaggerate every rounding difference), on the parity fixture's
network outputs, and with compilation on and off."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import FIXTURES, PARITY, load_expected
from m2fp_api import HumanParser, oracle
from m2fp_api.engine.backends import select_backend
from m2fp_api.engine.checkpoint import load_network
from m2fp_api.engine.compiled import CompiledHeads, input_sizes, multiple_human_sizes
from m2fp_api.engine.int8 import (CALIBRATION_SIZE, Int8Backbone, QuantizedFeedForward, calibration_inputs,
                                  observe_ranges, packing_input_size, quantize_backbone, quantize_feed_forwards)
from m2fp_api.engine.optimize import optimize
from m2fp_api.engine.preprocess import SHORT_SIDE
from m2fp_api.model.layers import ConvNorm

ORACLE = FIXTURES / "oracle"
HELD_OUT = 6
LOGIT_TOL = 1e-3  # the parity tests' tolerance for head outputs


@pytest.fixture(scope="module")
def scenes():
    return oracle.held_out(HELD_OUT)


@pytest.fixture(scope="module")
def oracle_exact():
    return HumanParser.from_pretrained(ORACLE, allow_download=False)


@pytest.fixture(scope="module")
def exact_maps(oracle_exact, scenes):
    return [oracle_exact.parse(s.image).class_map for s in scenes]


def test_oracle_is_a_marked_stand_in_that_parses_its_scenes(oracle_exact, scenes, exact_maps):
    """A useful oracle is confident and far better than chance (it finds people and
    their outline; it confuses look-alike parts); it never passes for a real model."""
    assert oracle_exact.info.pretrained is False
    overall = np.mean([(m == s.labels).mean() for m, s in zip(exact_maps, scenes)])
    on_figures = np.mean([(m == s.labels)[s.labels > 0].mean() for m, s in zip(exact_maps, scenes)])
    assert overall > 0.9, overall
    assert on_figures > 0.35, on_figures  # chance among 19 part classes: ~0.05
    scores = [p.score for p in oracle_exact.parse(scenes[0].image).parts]
    assert len(scores) >= 5 and np.median(scores) > 0.7, scores


def test_oracle_scenes_are_reproducible():
    a, b = oracle.scene(7, 96, 80), oracle.scene(7, 96, 80)
    np.testing.assert_array_equal(a.image, b.image)
    np.testing.assert_array_equal(a.labels, b.labels)
    assert not np.array_equal(a.image, oracle.scene(8, 96, 80).image)


@pytest.mark.parametrize("bf16, int8, name", [
    (True, False, "torch-bf16"), (True, True, "torch-int8-bf16"), (False, True, "torch-int8")])
def test_fast_agrees_with_exact_on_the_oracle(oracle_exact, scenes, exact_maps, bf16, int8, name):
    """Each form `fast` takes, forced (this CPU may lack native bf16 or int8 dot
    products: they then run correctly, slowly): bf16 through the whole network; the
    backbone and the encoder's feed-forwards in int8 with the rest in bf16, or in fp32."""
    backend = select_backend("fast", threads=oracle_exact.backend.threads, bf16=bf16, int8=int8)
    assert (backend.name, backend.int8) == (name, int8)
    fast = HumanParser(optimize(load_network(oracle_exact.source), backend.level, backend.int8),
                       oracle_exact.source, backend)
    assert isinstance(fast.network.backbone, Int8Backbone) == int8
    encoder = fast.network.sem_seg_head.pixel_decoder.transformer.encoder
    assert all(isinstance(layer.feed_forward, QuantizedFeedForward) == int8 for layer in encoder.layers)
    agreement = np.mean([oracle.agreement(e, fast.parse(s.image).class_map)
                         for e, s in zip(exact_maps, scenes)])
    assert agreement >= oracle.MIN_AGREEMENT, agreement


def test_int8_backbone_tracks_the_float_one(oracle_exact, scenes):
    """Every stage map of the int8 backbone stays close to the folded float backbone's on a
    held-out scene (not a calibration one), and comes back as floats of the right shape."""
    network = optimize(load_network(oracle_exact.source), "exact")
    quantized = quantize_backbone(network.backbone, calibration_inputs(network.prepare),
                                  packing_input_size(network.config))
    x = network.prepare(torch.from_numpy(np.ascontiguousarray(scenes[0].image)).permute(2, 0, 1)[None].float())
    with torch.inference_mode():
        expected, got = network.backbone(x), quantized(x)
    assert got.keys() == expected.keys()
    for name in expected:
        assert got[name].dtype == torch.float32 and got[name].shape == expected[name].shape
        error = (got[name] - expected[name]).norm() / expected[name].norm()
        assert error < 0.1, (name, float(error))


def test_int8_weights_are_laid_out_for_a_photo_sized_input(oracle_exact):
    """Calibrated on small scenes, each int8 convolution is packed for the input it gets
    from the network input `packing_input_size` names (oneDNN lays weights out by input
    size: packed for the calibration size, res5's shortcut was reordered at every photo's
    call)."""
    network = optimize(load_network(oracle_exact.source), "exact")
    height, width = packing_input_size(network.config)
    assert (height, width) == (SHORT_SIDE, SHORT_SIDE) != CALIBRATION_SIZE[::-1]
    ranges = observe_ranges(network.backbone, calibration_inputs(network.prepare), (height, width))
    seen = {}
    convs = [m for m in network.backbone.modules() if isinstance(m, ConvNorm)]
    hooks = [c.register_forward_hook(lambda c, args, out: seen.__setitem__(c, list(args[0].shape)))
             for c in convs]
    with torch.inference_mode():
        network.backbone(torch.zeros(1, 3, height, width).contiguous(memory_format=torch.channels_last))
    for hook in hooks:
        hook.remove()
    assert len(seen) == len(convs) > 10
    assert all(ranges[c].packing_shape == seen[c] for c in convs), [
        (ranges[c].packing_shape, seen[c]) for c in convs if ranges[c].packing_shape != seen[c]]


def test_a_single_human_models_int8_weights_are_laid_out_for_its_one_input_size(single_parser):
    config = single_parser.network.config
    assert packing_input_size(config) == input_sizes(config)[0] != (SHORT_SIDE, SHORT_SIDE)


@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
def test_int8_feed_forwards_track_the_float_ones(oracle_exact, scenes, bf16):
    """Each encoder layer's int8 feed-forward stays close to linear2(relu(linear1(x))) on
    a held-out scene, in the dtype the float layers give, and leaves x (which is also the
    layer's residual) as it was."""
    network = optimize(load_network(oracle_exact.source), "fast" if bf16 else "exact")
    layers = list(network.sem_seg_head.pixel_decoder.transformer.encoder.layers)
    assert quantize_feed_forwards(network, calibration_inputs(network.prepare)) == len(layers) > 0
    checked = []

    def compare(layer, x):
        before = x.clone()
        got = layer.feed_forward.forward(x)  # not through the hook calling this
        torch.testing.assert_close(x, before, atol=0, rtol=0)
        expected = layer.linear2(F.relu(layer.linear1(x)))
        assert got.dtype == expected.dtype and got.shape == expected.shape
        error = (got.float() - expected.float()).norm() / expected.float().norm()
        assert error < 0.1, float(error)
        checked.append(layer)

    for layer in layers:  # the first query chunk of each layer
        layer.feed_forward.register_forward_pre_hook(
            lambda module, args, layer=layer: None if layer in checked else compare(layer, args[0]))
    x = network.prepare(torch.from_numpy(np.ascontiguousarray(scenes[0].image)).permute(2, 0, 1)[None].float())
    with torch.inference_mode():
        network.predict(x)
    assert checked == layers


@pytest.mark.parametrize("int8", [False, True], ids=["bf16", "int8-bf16"])
def test_fast_stores_its_matrix_weights_in_bf16_with_identical_outputs(oracle_exact, int8, monkeypatch):
    """Weights kept in bf16 compute exactly what autocast's per-call rounding of the fp32
    weights computed."""
    from m2fp_api.engine import optimize as optimize_module

    x = torch.rand(1, 3, 200, 264, generator=torch.Generator().manual_seed(0)) * 255
    outputs = []
    for store in (False, True):
        with monkeypatch.context() as patch:
            if not store:
                patch.setattr(optimize_module, "store_matrix_weights", lambda network, dtype: 0)
            network = optimize(load_network(oracle_exact.source), "fast", int8=int8)
        linear = network.sem_seg_head.predictor.class_embed
        assert linear.weight.dtype == (torch.bfloat16 if store else torch.float32)
        with torch.inference_mode():
            outputs.append(network(x))
    torch.testing.assert_close(outputs[0].pred_logits, outputs[1].pred_logits, atol=0, rtol=0)
    torch.testing.assert_close(outputs[0].pred_masks, outputs[1].pred_masks, atol=0, rtol=0)


def test_exact_linear_layers_through_onednn_stay_within_rounding_of_addmm():
    """`exact` runs its linear layers through oneDNN (twice MKL's fp32 speed on Zen 5);
    addmm, as ModelScope computes them, gives the same outputs to float rounding."""
    network = optimize(load_network(HumanParser.from_pretrained(
        PARITY / "tiny-multiple", allow_download=False).source), "exact")
    assert network.variant.onednn_linear
    x = torch.rand(1, 3, 200, 264, generator=torch.Generator().manual_seed(0)) * 255

    def run():
        with torch.inference_mode(), torch.profiler.profile() as profile:
            out = network(x)
        return out, {e.name for e in profile.events()}

    onednn, onednn_ops = run()
    network.configure(replace(network.variant, onednn_linear=False))
    addmm, addmm_ops = run()
    assert "mkldnn::_linear_pointwise" in onednn_ops and "mkldnn::_linear_pointwise" not in addmm_ops
    # every product, the attention modules' projections included
    assert "aten::addmm" not in onednn_ops and "aten::addmm" in addmm_ops
    torch.testing.assert_close(onednn.pred_logits, addmm.pred_logits, atol=1e-4, rtol=0)
    torch.testing.assert_close(onednn.pred_masks, addmm.pred_masks, atol=1e-4, rtol=0)


def test_fast_falls_back_to_exact_without_native_bf16_or_int8():
    backend = select_backend("fast", threads=2, bf16=False, int8=False)
    assert (backend.name, backend.dtype, backend.level, backend.int8) == (
        "torch-fp32", "float32", "exact", False)


def test_reference_agrees_with_exact_on_the_oracle(oracle_exact, scenes, exact_maps):
    """ModelScope's formulation (the benchmark's same-run baseline) computes the same."""
    reference = HumanParser.from_pretrained(ORACLE, backend="reference", allow_download=False)
    agreement = np.mean([oracle.agreement(e, reference.parse(s.image).class_map)
                         for e, s in zip(exact_maps, scenes)])
    assert agreement >= oracle.MIN_AGREEMENT, agreement


# --- ONNX -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def onnx_model(tmp_path_factory):
    pytest.importorskip("onnxscript", reason="the [onnx] extra (the exporter) is not installed")
    from m2fp_api.engine.onnx import export_onnx

    network = optimize(load_network(HumanParser.from_pretrained(
        PARITY / "tiny-multiple", allow_download=False).source), "exact")
    return export_onnx(network, tmp_path_factory.mktemp("onnx") / "tiny.onnx")


def test_an_export_is_reused_only_by_the_code_that_made_it(tmp_path, monkeypatch):
    """The cached export is named after the network's source, not only the checkpoint
    and torch: after an edit of the network, the service exports again instead of
    running a stale graph (the package's version does not move with every edit)."""
    import shutil

    from m2fp_api.engine.onnx import cached_export_path
    from m2fp_api.model import m2fp

    code = tmp_path / "model"
    shutil.copytree(Path(m2fp.__file__).parent, code, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(m2fp, "__file__", str(code / "m2fp.py"))
    weights = tmp_path / "weights.pt"
    weights.write_bytes(b"weights")
    first = cached_export_path(tmp_path / "cache", weights)
    assert cached_export_path(tmp_path / "cache", weights) == first
    with (code / "deform_attn.py").open("a") as source:
        source.write("# an edit\n")
    assert cached_export_path(tmp_path / "cache", weights) != first


@pytest.fixture
def onnxruntime_installed():
    pytest.importorskip("onnxruntime", reason="the [onnx] extra is not installed")


@pytest.mark.timeout(900)  # includes the export (the module's fixture): a minute or more
@pytest.mark.parametrize("size", [(640, 1152), (1344, 640)], ids=["landscape", "portrait"])
def test_onnx_round_trip_matches_torch_at_two_aspect_ratios(onnx_model, multiple_parser, size,
                                                            onnxruntime_installed):
    """One export, any input size: ONNX Runtime's outputs equal the torch network's
    within the parity tolerance, at sizes the export was not traced at."""
    from m2fp_api.engine.onnx import EXAMPLE_SIZE, OnnxNetwork

    assert size != EXAMPLE_SIZE
    exported = OnnxNetwork(onnx_model, multiple_parser.config, threads=2)
    images = torch.rand(1, 3, size[0] - 5, size[1] - 7, generator=torch.Generator().manual_seed(0)) * 255
    with torch.inference_mode():
        expected = multiple_parser.network(images)
    got = exported(images)
    assert got.padded_size == expected.padded_size == size
    torch.testing.assert_close(got.pred_logits, expected.pred_logits, atol=LOGIT_TOL, rtol=0)
    torch.testing.assert_close(got.pred_masks, expected.pred_masks, atol=LOGIT_TOL, rtol=0)


@pytest.mark.timeout(900)
def test_onnx_backend_matches_the_parity_fixture(onnx_model, multiple_parser, tmp_path, onnxruntime_installed):
    """The exported network, in ONNX Runtime, reproduces ModelScope's head outputs for
    the fixture."""
    from m2fp_api.engine.onnx import OnnxNetwork

    expected = load_expected("tiny-multiple")
    x = torch.from_numpy(expected["astronaut.jpg:input"]).float()[None]
    out = OnnxNetwork(onnx_model, multiple_parser.config, threads=2)(x)
    np.testing.assert_allclose(out.pred_logits.numpy(), expected["astronaut.jpg:pred_logits"],
                               atol=LOGIT_TOL)
    ref = expected["astronaut.jpg:pred_masks"].astype(np.float32)  # stored as fp16
    err = np.abs(out.pred_masks.numpy() - ref)
    assert (err <= LOGIT_TOL + np.abs(ref) * 2.0**-11).all(), float(err.max())


@pytest.mark.timeout(900)
def test_onnx_backend_agrees_with_exact_on_the_oracle(tmp_path, scenes, exact_maps, onnxruntime_installed):
    parser = HumanParser.from_pretrained(ORACLE, backend="onnxruntime", cache_dir=tmp_path,
                                         allow_download=False)
    assert parser.info.backend == "onnxruntime-fp32"
    assert len(list((tmp_path / "onnx").glob("*.onnx"))) == 1, "exported once, into the cache directory"
    agreement = np.mean([oracle.agreement(e, parser.parse(s.image).class_map)
                         for e, s in zip(exact_maps, scenes)])
    assert agreement >= oracle.MIN_AGREEMENT, agreement


def test_an_export_that_fails_says_why_and_leaves_no_model_behind(tmp_path, onnxruntime_installed):
    """The export runs in a child process (`m2fp export`): its failure reaches the caller
    as ModelUnavailable with the child's reason, and the cache holds no model, whole or
    partial (only the lock that keeps processes from exporting at once)."""
    import shutil

    from m2fp_api.errors import ModelUnavailable

    broken = tmp_path / "broken"
    shutil.copytree(ORACLE, broken)
    (broken / "pytorch_model.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ModelUnavailable, match="could not be read"):
        HumanParser.from_pretrained(broken, backend="onnxruntime", cache_dir=tmp_path / "cache",
                                    allow_download=False)
    assert [p.suffix for p in (tmp_path / "cache" / "onnx").iterdir()] == [".lock"]


# --- compilation ------------------------------------------------------------------------

def test_input_sizes_cover_the_multiple_human_preprocessing():
    from m2fp_api.engine.preprocess import multiple_human_size

    sizes = set(multiple_human_sizes())
    for w, h in [(640, 480), (1920, 1080), (1080, 1920), (4000, 1000), (500, 500), (3000, 2000)]:
        nh, nw = multiple_human_size(h, w)
        assert (-(-nh // 32) * 32, -(-nw // 32) * 32) in sizes


@pytest.mark.timeout(1200)  # a cold inductor compile: about a minute on an idle 2-core machine
@pytest.mark.parametrize("compile", [False, True], ids=["eager", "compiled"])
def test_compiled_heads_equal_eager_and_never_block(tmp_path, compile):
    """Compilation off: no compiler. On: requests run eagerly until the background compile
    is ready for their size, then compiled, with the same outputs."""
    parser = HumanParser.from_pretrained(PARITY / "tiny-multiple", allow_download=False,
                                         compile=compile, cache_dir=tmp_path)
    if not compile:
        assert parser.compiler is None and parser.network.variant.heads is None
        return
    compiler = parser.compiler
    compiler.sizes = [(640, 864)]  # one size keeps the test short; the list is tested above
    images = torch.rand(1, 3, 640, 860, generator=torch.Generator().manual_seed(1)) * 255
    with torch.inference_mode():
        eager = parser.network(images)
    assert not compiler.ready
    parser.warm_up()  # starts the background compile
    with torch.inference_mode():
        during = parser.network(images)  # does not wait for the compile
    assert compiler.wait(timeout=1100), "the compile did not finish"
    assert compiler.failed is None, compiler.failed
    assert compiler.ready == {(640, 864)}
    with torch.inference_mode():
        compiled = parser.network(images)
    torch.testing.assert_close(during.pred_logits, eager.pred_logits, atol=0, rtol=0)
    torch.testing.assert_close(compiled.pred_logits, eager.pred_logits, atol=LOGIT_TOL, rtol=0)
    torch.testing.assert_close(compiled.pred_masks, eager.pred_masks, atol=LOGIT_TOL, rtol=0)
    assert list((tmp_path / "inductor").iterdir()), "inductor's artefacts are kept in the cache dir"


@pytest.mark.timeout(1200)
def test_fast_heads_compile_with_their_int8_feed_forwards(tmp_path):
    """The int8 feed-forwards are one op to inductor, kept as it is (its own lowering of
    oneDNN's int8 linear wants weights frozen into the graph): fast's heads compile, and
    give what eager gives to bf16 rounding."""
    backend = select_backend("fast", threads=2, bf16=True, int8=True)
    source = HumanParser.from_pretrained(PARITY / "tiny-multiple", allow_download=False).source
    network = optimize(load_network(source), backend.level, backend.int8)
    compiler = CompiledHeads(network, [(640, 864)], tmp_path)
    parser = HumanParser(network, source, backend, compiler=compiler)
    images = torch.rand(1, 3, 640, 860, generator=torch.Generator().manual_seed(1)) * 255
    with torch.inference_mode():
        eager = parser.network(images)
    parser.warm_up()
    assert compiler.wait(timeout=1100) and compiler.failed is None, compiler.failed
    assert compiler.ready == {(640, 864)}
    with torch.inference_mode():
        compiled = parser.network(images)
    for got, expected in ((compiled.pred_logits, eager.pred_logits), (compiled.pred_masks, eager.pred_masks)):
        assert (got - expected).norm() / expected.norm() < 0.02


@pytest.mark.timeout(600)
def test_a_failed_compile_leaves_the_eager_heads_in_charge(tmp_path, monkeypatch):
    parser = HumanParser.from_pretrained(PARITY / "tiny-multiple", allow_download=False,
                                         compile=True, cache_dir=tmp_path)

    def broken(*args, **kwargs):
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(torch, "compile", broken)
    parser.warm_up()
    assert parser.compiler.wait(timeout=60)
    assert "no C++ compiler" in parser.compiler.failed
    result = parser.parse(PARITY / "images" / "astronaut.jpg")
    assert result.parts


def test_single_human_models_compile_their_one_input_size():
    from m2fp_api.model import M2FPConfig
    from conftest import configuration

    cfg = M2FPConfig.from_model_section(configuration("tiny-single")["model"])
    (size,) = input_sizes(cfg)
    assert size[0] % 32 == 0 and size[1] % 32 == 0


def test_one_call_sets_the_inference_variant_in_every_module():
    from conftest import configuration
    from m2fp_api.model import M2FP, InferenceVariant, M2FPConfig
    from m2fp_api.model.deform_attn import GATHER, GRID_SAMPLE, MSDeformAttn
    from m2fp_api.model.layers import Linear, MultiheadAttention
    from m2fp_api.model.pixel_decoder import EncoderLayer

    network = M2FP(M2FPConfig.from_model_section(configuration("tiny-multiple")["model"]))
    attention = [m for m in network.modules() if isinstance(m, MSDeformAttn)]
    layers = [m for m in network.modules() if isinstance(m, EncoderLayer)]
    # every linear layer but the attention modules' output projections (the attention
    # modules run them, as they run their input projections), and every attention module
    linears = [m for m in network.modules() if isinstance(m, torch.nn.Linear)
               and not isinstance(m, torch.nn.modules.linear.NonDynamicallyQuantizableLinear)]
    linears += [m for m in network.modules() if isinstance(m, torch.nn.MultiheadAttention)]
    assert attention and layers and all(isinstance(m, (Linear, MultiheadAttention)) for m in linears)

    def conv_weight():  # a 3x3 convolution's: its layout tells channels-last from NCHW
        return next(p for p in network.backbone.parameters() if p.dim() == 4 and p.shape[-1] > 1)

    network.configure(InferenceVariant(gathered_sampling=False, level_masks=True, channels_last=True,
                                       chunked=False, onednn_linear=True))
    assert all(m.sampler is GRID_SAMPLE and m.query_chunk is None for m in attention)
    assert all(m.onednn for m in linears)
    assert all(m.ffn_chunk is None for m in layers)
    assert network.backbone.stem.chunk_bytes  # its own switch: compiled heads leave it on
    network.configure(replace(network.variant, stem_in_pieces=False))
    assert network.backbone.stem.chunk_bytes is None
    assert network.sem_seg_head.predictor.resize_features_first
    assert conv_weight().is_contiguous(memory_format=torch.channels_last) and not conv_weight().is_contiguous()

    network.configure(InferenceVariant())  # a freshly built network's
    assert all(m.sampler is GATHER and m.query_chunk for m in attention)
    assert all(m.ffn_chunk for m in layers) and not network.sem_seg_head.predictor.resize_features_first
    assert network.backbone.stem.chunk_bytes
    assert not any(m.onednn for m in linears)
    assert conv_weight().is_contiguous()
    with pytest.raises(ValueError, match="float16"):
        InferenceVariant(dtype=torch.float16)
