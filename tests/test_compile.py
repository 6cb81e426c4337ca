"""Bundles: end-to-end compile, round trip, fusion, overflow refusal, corruption detection."""

import json

import pytest
import torch
from integer_op import integer_op

from hetune.compile.bundle import MANIFEST_FILE, WEIGHTS_FILE, load_bundle, write_bundle
from hetune.compile.compiler import CompileConfig, compile_bundle, compile_model
from hetune.compile.manifest import CryptoSpec, Manifest
from hetune.errors import BundleError, OverflowRiskError
from hetune.models.layers import decoder_layers, member_linear
from hetune.crypto.registry import get_scheme, resolve_params
from hetune.quant.budget import accumulator_bound
from hetune.quant.config import QuantConfig
from hetune.quant.rotation import input_rotation
from hetune.quant.weights import quantize_weight


def test_manifest_round_trips(compiled):
    data = json.loads(json.dumps(compiled.manifest.to_dict()))
    assert Manifest.from_dict(data) == compiled.manifest
    assert compiled.manifest.quant.rotation == "hadamard"  # the default
    del data["quant"]["rotation"]  # a bundle from before rotation existed holds W itself
    assert Manifest.from_dict(data).quant.rotation == "none"
    for op in data["ops"]:  # nor per-op widths: every op had the config's
        del op["bits_a"], op["bits_g"]
    assert {(op.bits_a, op.bits_g) for op in Manifest.from_dict(data).ops} == {(12, 12)}


def test_bundle_round_trips_and_holds_only_integers(bundle_dir, compiled):
    bundle = load_bundle(bundle_dir)
    assert bundle.manifest.ops == compiled.manifest.ops
    assert set(bundle.tensors) == set(compiled.tensors)
    for spec in bundle.manifest.ops:
        assert bundle.tensors[spec.weight_key].dtype == torch.int8
        assert torch.equal(bundle.tensors[spec.weight_key], compiled.tensors[spec.weight_key])
    floats = [k for k, t in bundle.tensors.items() if t.is_floating_point()]
    assert floats and all(k.endswith(".scale") for k in floats)  # scales only, no float weights


def test_bundle_covers_every_outsourced_linear(bundle_dir, tiny):
    m = load_bundle(bundle_dir).manifest
    cfg = tiny.model.config
    assert len(m.ops) == 4 * cfg.num_hidden_layers
    members = [mm.module for op in m.ops for mm in op.members]
    assert len(members) == 7 * cfg.num_hidden_layers
    qkv = m.op("layers.0.qkv")
    kv = cfg.num_key_value_heads * cfg.hidden_size // cfg.num_attention_heads
    assert [mm.out_features for mm in qkv.members] == [cfg.hidden_size, kv, kv]
    assert 0.9 < m.outsourced_params / m.model.total_params < 1.0


def test_bundle_op_matches_the_model_weights(bundle_dir, tiny):
    bundle = load_bundle(bundle_dir)
    lin = member_linear(decoder_layers(tiny.model), "layers.2.mlp.down_proj")
    x = torch.randn(5, lin.in_features, dtype=torch.float64)
    y = bundle.op("layers.2.down").forward(x)
    ref = x @ lin.weight.to(torch.float64).T
    assert float((y - ref).norm() / ref.norm()) < 0.03


def test_fused_op_equals_its_unfused_parts_bit_for_bit(tiny, compiled):
    """Per-channel weights and a shared per-token input make fusion exact."""
    unfused = compile_model(tiny, CompileConfig(fuse=False, calibration_tokens=16), progress=False)
    x = torch.randn(4, tiny.model.config.hidden_size, dtype=torch.float64)
    widths = compiled.manifest.op("layers.1.qkv").bits_a, compiled.manifest.op("layers.1.qkv").bits_g

    def op(c, name):
        s = c.manifest.op(name)
        return integer_op(c.tensors[s.weight_key], c.tensors[s.scale_key], *widths)

    fused = op(compiled, "layers.1.qkv").forward(x)
    parts = torch.cat([op(unfused, f"layers.1.{n}").forward(x) for n in ("q", "k", "v")], dim=1)
    assert torch.equal(fused, parts)


def test_compile_of_peft_model_equals_plain(tiny, compiled):
    import copy

    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(copy.deepcopy(tiny.model), LoraConfig(r=4, target_modules="all-linear"))
    wrapped = compile_model(type(tiny)(peft_model, tiny.tokenizer, tiny.model_id), CompileConfig(calibration_tokens=16), progress=False)
    assert wrapped.manifest.model.weights_sha256 == compiled.manifest.model.weights_sha256
    assert wrapped.manifest.model.total_params == compiled.manifest.model.total_params
    for key, tensor in compiled.tensors.items():
        assert torch.equal(wrapped.tensors[key], tensor)


def test_overflowing_config_is_refused_unless_accepted(tiny, tmp_path):
    params = get_scheme("rlwe").params("p128")
    limit = f"{params.max_weight_l2:.0f}"
    cfg = CompileConfig(quant=QuantConfig(bits_w=12, bits_a=12, bits_g=12), calibration_tokens=16)
    with pytest.raises(OverflowRiskError, match=rf"cannot decrypt exactly under rlwe/p128 .* exceeds the {limit}") as info:
        compile_model(tiny, cfg, progress=False)
    assert "--accept-overflow-risk" in info.value.hint
    risky = CompileConfig(quant=QuantConfig(12, 12, 12, accept_overflow_risk=True), calibration_tokens=16)
    result = compile_model(tiny, risky, progress=False)
    assert result.report["overflow_risk_ops"]
    assert all(s.worst_acc_bits > params.budget_bits or max(s.forward_l2, s.backward_l2) > params.max_weight_l2
               for s in result.manifest.ops if s.name in result.report["overflow_risk_ops"])
    assert all((s.bits_a, s.bits_g) == (12, 12) for s in result.manifest.ops)  # accepted: the widths asked for


@pytest.mark.parametrize("scheme", ["rlwe", "glwe"])
def test_each_op_gets_the_widest_inputs_that_fit_the_scheme(tiny, scheme):
    """10-bit weights, inputs up to 14 bits: every op narrowed just enough, each direction on its own."""
    budget = resolve_params(scheme, None).budget_bits  # rlwe 29, glwe 27
    result = compile_model(tiny, CompileConfig(quant=QuantConfig(bits_w=10, bits_a=14, bits_g=14), calibration_tokens=16,
                                               scheme=scheme), progress=False)
    widths = set()
    for spec in result.manifest.ops:
        q = result.tensors[spec.weight_key]
        assert spec.worst_acc_bits <= budget and 8 <= spec.bits_a <= 14 and 8 <= spec.bits_g <= 14
        if spec.bits_a < 14:  # one bit wider would not fit
            assert accumulator_bound(q, 10, spec.bits_a + 1, spec.bits_g).forward_bits > budget
        if spec.bits_g < 14:
            assert accumulator_bound(q, 10, spec.bits_a, spec.bits_g + 1).backward_bits > budget
        widths.add((spec.bits_a, spec.bits_g))
    assert len(widths) > 1 and min(widths) < (14, 14)  # narrowed, and not all ops alike
    rows = {r["op"]: (r["bits_a"], r["bits_g"]) for r in result.report["ops"]}
    assert rows == {s.name: (s.bits_a, s.bits_g) for s in result.manifest.ops}


def test_glwe_bundles_check_against_their_own_27_bit_budget(tiny):
    """10/11/11 bits fit the batched RLWE budget (29 bits); under Concrete ML's GLWE (27) compile narrows them."""
    cfg = dict(quant=QuantConfig(bits_w=10, bits_a=11, bits_g=11), calibration_tokens=16)
    rlwe = compile_model(tiny, CompileConfig(**cfg), progress=False)
    assert rlwe.manifest.crypto == CryptoSpec("rlwe", "p128")
    assert 27 < max(s.worst_acc_bits for s in rlwe.manifest.ops) <= resolve_params("rlwe", None).budget_bits
    assert all((s.bits_a, s.bits_g) == (11, 11) for s in rlwe.manifest.ops)
    glwe = compile_model(tiny, CompileConfig(**cfg, scheme="glwe"), progress=False)
    assert max(s.worst_acc_bits for s in glwe.manifest.ops) <= 27
    assert any(s.bits_a < 11 or s.bits_g < 11 for s in glwe.manifest.ops)
    rlwe_params = resolve_params("rlwe", None)
    assert not rlwe.manifest.problems(rlwe_params) and glwe.manifest.problems(resolve_params("glwe", None)) == []
    assert rlwe.manifest.problems(resolve_params("glwe", None))  # an RLWE-fitted bundle is refused by a GLWE session


def test_weight_norms_beyond_the_rlwe_noise_budget_are_refused(tiny):
    """16-bit weights: row norms far above what keeps RLWE decoding failures below 2^-100."""
    with pytest.raises(OverflowRiskError, match="weight L2 norm .* exceeds"):
        compile_model(tiny, CompileConfig(quant=QuantConfig(bits_w=16, bits_a=2, bits_g=2), calibration_tokens=16), progress=False)


def test_report_has_per_layer_error_and_bits(compiled):
    rows = compiled.report["ops"]
    assert len(rows) == len(compiled.manifest.ops)
    for row in rows:
        assert 0 < row["forward_rel_err"] < 0.05 and 0 < row["backward_rel_err"] < 0.05
        assert row["forward_acc_bits"] <= row["generic_acc_bits"] <= 30
        assert 0 < row["forward_l2"] <= 127 * row["in"] ** 0.5 and 0 < row["backward_l2"] <= 127 * row["out"] ** 0.5


@pytest.mark.parametrize("damage", ["flip", "truncate", "manifest_json", "manifest_field", "no_weights", "no_manifest"])
def test_damaged_bundle_is_detected(bundle_dir, tmp_path, damage):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(bundle_dir, bad)
    weights, manifest = bad / WEIGHTS_FILE, bad / MANIFEST_FILE
    if damage == "flip":
        data = bytearray(weights.read_bytes())
        data[len(data) // 2] ^= 0xFF
        weights.write_bytes(bytes(data))
    elif damage == "truncate":
        weights.write_bytes(weights.read_bytes()[:-100])
    elif damage == "manifest_json":
        manifest.write_text(manifest.read_text()[:50])
    elif damage == "manifest_field":
        data = json.loads(manifest.read_text())
        del data["ops"][0]["in_features"]
        manifest.write_text(json.dumps(data))
    elif damage == "no_weights":
        weights.unlink()
    else:
        manifest.unlink()
    with pytest.raises(BundleError):
        load_bundle(bad)


def test_write_refuses_existing_and_leaves_nothing_on_failure(compiled, tmp_path, monkeypatch):
    out = tmp_path / "b"
    write_bundle(out, compiled.manifest, compiled.tensors, compiled.report)
    with pytest.raises(BundleError, match="already exists"):
        write_bundle(out, compiled.manifest, compiled.tensors, compiled.report)

    def boom(*_a, **_k):
        raise OSError("disk full")

    monkeypatch.setattr("safetensors.torch.save_file", boom)
    with pytest.raises(BundleError, match="disk full"):
        write_bundle(tmp_path / "c", compiled.manifest, compiled.tensors, compiled.report)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]  # no partial or temp directory
    with pytest.raises(BundleError):
        write_bundle(out, compiled.manifest, compiled.tensors, compiled.report, overwrite=True)
    assert load_bundle(out).manifest.ops == compiled.manifest.ops  # old bundle intact


def test_compile_bundle_checks_the_output_before_loading_and_returns_the_written_manifest(bundle_dir, compiled, tmp_path, monkeypatch):
    """The one compile-and-write: a bad --out fails before the model loads; the manifest returned is the one on disk."""
    assert compiled.manifest == load_bundle(bundle_dir).manifest and compiled.manifest.files  # the conftest bundle, hashed
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "x").write_text("")

    def no_load(*_a, **_k):
        raise AssertionError("loaded the model before checking --out")

    monkeypatch.setattr("hetune.compile.compiler.load_model", no_load)
    with pytest.raises(BundleError, match="already exists"):
        compile_bundle("micro-llama", tmp_path / "taken", CompileConfig(calibration_tokens=16))
    assert (tmp_path / "taken" / "x").exists()


def test_weights_quantization_matches_brevitas_in_bundle(compiled, tiny):
    lin = member_linear(decoder_layers(tiny.model), "layers.3.self_attn.o_proj")
    spec = compiled.manifest.op("layers.3.o")
    qw = quantize_weight(input_rotation(compiled.manifest.quant, lin.in_features).apply(lin.weight), 8)  # of W R
    assert torch.equal(compiled.tensors[spec.weight_key], qw.q)
    assert torch.equal(compiled.tensors[spec.scale_key], qw.scale)


def test_rotated_bundle_records_its_rotation_and_stays_exact_in_float(tiny, tmp_path):
    """A Hadamard bundle stores W R; the manifest names R (kind and seed), so the client's codec rotates alike."""
    quant = QuantConfig(rotation="hadamard", rotation_seed=5)
    compiled = compile_bundle(tiny, tmp_path / "b", CompileConfig(quant=quant, calibration_tokens=32), progress=False)
    bundle = load_bundle(tmp_path / "b")
    assert bundle.manifest.quant == quant and compiled.report["quant"]["rotation"] == "hadamard"
    spec = bundle.manifest.op("layers.1.down")
    op = bundle.op(spec.name)
    assert op.codec.rotation is not None and op.codec.rotation.n == spec.in_features and op.codec.rotation.seed == 5
    weight = member_linear(decoder_layers(tiny.model), "layers.1.mlp.down_proj").weight.detach().to(torch.float64)
    dequantized = op.codec.rotation.invert(op.q.to(torch.float64) * op.codec.scale.to(torch.float64)[:, None])  # W_q s R^T ~ W
    assert float((dequantized - weight).norm() / weight.norm()) < 0.01
    x = torch.randn(16, spec.in_features, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert float((op.forward(x) - x @ weight.T).norm() / (x @ weight.T).norm()) < 0.02
    assert all(r["forward_rel_err"] < 0.05 and r["backward_rel_err"] < 0.05 for r in compiled.report["ops"])
