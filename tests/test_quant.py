"""HE-compatible quantization: Brevitas weights, per-token inputs, the integer op, the budget."""

import numpy as np
import pytest
import torch
from integer_op import integer_op

from hetune.errors import ConfigError
from hetune.quant.budget import accumulator_bound, signed_bits
from hetune.quant.config import QuantConfig
from hetune.quant.integer import OpCodec
from hetune.quant.rotation import HadamardRotation, sylvester
from hetune.quant.tokens import quantize_activations, quantize_gradients
from hetune.quant.weights import brevitas_quant_linear, quantize_weight


@pytest.mark.parametrize("field,value", [("bits_w", 1), ("bits_a", 17), ("bits_g", 0), ("bits_w", 8.0), ("bits_a", True)])
def test_config_rejects_bad_bits(field, value):
    with pytest.raises(ConfigError, match=field):
        QuantConfig(**{field: value})


@pytest.mark.parametrize("bits", [2, 4, 8, 12, 16])
def test_weight_integers_are_brevitas_per_channel(bits, rng):
    w = torch.randn(24, 40, generator=rng) * torch.linspace(0.1, 3.0, 24)[:, None]
    qw = quantize_weight(w, bits)
    qmax = 2 ** (bits - 1) - 1
    assert qw.q.dtype == (torch.int8 if bits <= 8 else torch.int16)
    assert int(qw.q.abs().max()) == qmax  # narrow range, each channel's max hits it
    assert (qw.q.abs().amax(dim=1) == qmax).all()
    assert qw.scale.shape == (24,)
    reference = brevitas_quant_linear(w, bits).quant_weight().value  # Brevitas' fake-quantized weight
    torch.testing.assert_close(qw.dequantize(), reference, rtol=0, atol=0)


def test_token_quantization_ranges(rng):
    x = torch.randn(6, 33, generator=rng, dtype=torch.float64) * 4
    x[2] = 0.0  # all-zero row
    x[3] = 2.5  # constant positive row
    tq = quantize_activations(x, 8)
    assert tq.q.min() >= 0 and tq.q.max() <= 255 and torch.equal(tq.q, tq.q.round())
    recon = (tq.q - tq.zero_point) * tq.scale
    assert ((recon - x).abs() <= tq.scale / 2 + 1e-12).all()
    assert torch.equal(recon[2], x[2]) and torch.allclose(recon[3], x[3])
    gq = quantize_gradients(x, 8)
    assert gq.q.abs().max() <= 127 and torch.equal(gq.zero_point, torch.zeros_like(gq.zero_point))
    assert ((gq.q * gq.scale - x).abs() <= gq.scale / 2 + 1e-12).all()


@pytest.mark.parametrize("rotated", [False, True])
def test_the_in_place_codec_equals_the_out_of_place_formulas_bit_for_bit_and_leaves_its_inputs(rotated, rng):
    """The codec works in place on its own copies (no full-size temporaries); every bit (signed zeros included)
    is the plain formulas', and the caller's activations, gradients and nothing else are left as they were."""
    n_in, n_out = 48, 20
    codec = OpCodec(scale=torch.rand(n_out, generator=rng) * 1e-2, rowsum=torch.randint(-999, 999, (n_out,), generator=rng).double(),
                    bits_a=10, bits_g=9, rotation=HadamardRotation(n_in) if rotated else None)
    for dtype in (torch.float32, torch.float64):
        x, g = torch.randn(17, n_in, generator=rng, dtype=dtype), torch.randn(17, n_out, generator=rng, dtype=dtype)
        x[2], g[3] = 0.0, 0.0  # all-zero rows: scale 0 (17 rows: torch's vector loops too, where a max of 0 and -0 is -0)
        x0, g0 = x.clone(), g.clone()
        xr = x.to(torch.float64) * codec.rotation.signs if rotated else x.to(torch.float64)
        xr = codec.rotation._kron(xr, codec.rotation.dct) if rotated else xr
        lo, hi = xr.amin(1, keepdim=True).clamp(max=0.0), xr.amax(1, keepdim=True).clamp(min=0.0)
        scale = (hi - lo) / 1023
        safe = torch.where(scale > 0, scale, torch.ones_like(scale))
        zp = torch.round(-lo / safe)
        want_q = torch.clamp(torch.round(xr / safe) + zp, 0, 1023)
        tq = codec.encode_input(x)
        raw = torch.randint(-2**30, 2**30, (17, n_out), generator=rng).double()
        want_y = (raw - zp * codec.rowsum[None, :]) * scale * codec.scale.to(torch.float64)[None, :]
        y = codec.decode_output(raw.clone(), tq)
        gs = g.to(torch.float64) * codec.scale.to(torch.float64)
        gscale = gs.abs().amax(1, keepdim=True) / 255
        want_gq = torch.clamp(torch.round(gs / torch.where(gscale > 0, gscale, torch.ones_like(gscale))), -255, 255)
        gq = codec.encode_grad(g)
        raw_b = torch.randint(-2**30, 2**30, (17, n_in), generator=rng).double()
        want_dx = raw_b * gscale
        want_dx = codec.rotation._kron(want_dx, codec.rotation.dct.T) * codec.rotation.signs if rotated else want_dx
        dx = codec.decode_grad(raw_b.clone(), gq)
        for got, want in [(tq.q, want_q), (tq.scale, scale), (tq.zero_point, zp), (y, want_y), (gq.q, want_gq),
                          (gq.scale, gscale), (dx, want_dx)]:
            assert got.dtype == want.dtype and torch.equal(got.view(torch.int64), want.view(torch.int64))
        assert torch.equal(x, x0) and torch.equal(g, g0)


def _numpy_reference(x, qw, bits_a, bits_g, g):
    """Independent int64 implementation of the spec's formulas."""
    tq = quantize_activations(x, bits_a)
    xq = tq.q.numpy().astype(np.int64)
    W = qw.q.numpy().astype(np.int64)
    raw = xq @ W.T  # what the worker computes
    acc = raw - tq.zero_point.numpy().astype(np.int64) * W.sum(axis=1)[None, :]
    y = acc.astype(np.float64) * tq.scale.numpy() * qw.scale.numpy().astype(np.float64)[None, :]
    gq = quantize_gradients(g * qw.scale.to(torch.float64), bits_g)
    raw_b = gq.q.numpy().astype(np.int64) @ W
    dx = raw_b.astype(np.float64) * gq.scale.numpy()
    return raw, y, raw_b, dx


@pytest.mark.parametrize("bits", [(8, 8, 8), (4, 6, 5), (12, 8, 10)])
def test_quantized_op_is_bit_exact_integer_arithmetic(bits, rng):
    bits_w, bits_a, bits_g = bits
    w = torch.randn(48, 80, generator=rng)
    x = torch.randn(7, 80, generator=rng)
    g = torch.randn(7, 48, generator=rng, dtype=torch.float64)
    qw = quantize_weight(w, bits_w)
    op = integer_op(qw.q, qw.scale, bits_a, bits_g)
    raw, y, raw_b, dx = _numpy_reference(x, qw, bits_a, bits_g, g)
    assert np.array_equal(op.raw_forward(op.encode_input(x).q).numpy().astype(np.int64), raw)
    assert np.array_equal(op.forward(x).numpy(), y)  # bit for bit, not allclose
    assert np.array_equal(op.backward(g).numpy(), dx)
    assert np.array_equal(op.raw_backward(op.encode_grad(g).q).numpy().astype(np.int64), raw_b)


def test_error_shrinks_with_bits(rng):
    w = torch.randn(64, 128, generator=rng, dtype=torch.float64)
    x = torch.randn(16, 128, generator=rng, dtype=torch.float64)
    errs = []
    for b in (4, 6, 8):
        qw = quantize_weight(w, b)
        y = integer_op(qw.q, qw.scale, b, b).forward(x)
        errs.append(float((y - x @ w.T).norm() / (x @ w.T).norm()))
    assert errs[0] > errs[1] > errs[2]
    assert errs[2] < 0.02


def test_signed_bits():
    assert signed_bits(0) == 1
    assert signed_bits(1) == 2
    assert signed_bits(2**26 - 1) == 27  # fits the 27-bit GLWE budget
    assert signed_bits(2**26) == 28


def test_accumulator_bound_is_the_exact_worst_case(rng):
    q = torch.randint(-7, 8, (5, 9), generator=rng).to(torch.int8)
    b = accumulator_bound(q, bits_w=4, bits_a=3, bits_g=3)
    W = q.to(torch.int64)
    # forward worst case is reached by x = 7 where W > 0 (or W < 0), 0 elsewhere
    worst_fwd = max(int(max((W.clamp(min=0) * 7).sum(1).max(), (W.clamp(max=0) * 7).sum(1).abs().max())), 0)
    # backward worst case is reached by g = 3 * sign(W[:, i])
    worst_bwd = int((W.abs() * 3).sum(0).max())
    assert b.forward_bits == signed_bits(worst_fwd)
    assert b.backward_bits == signed_bits(worst_bwd)
    # brute force on random inputs never exceeds the bound
    x = torch.randint(0, 8, (2000, 9), generator=rng)
    assert signed_bits(int((x @ W.T).abs().max())) <= b.forward_bits
    assert b.generic_bits >= max(b.forward_bits, b.backward_bits)


@pytest.mark.parametrize("kw,field", [({"rotation": "random"}, "rotation"), ({"clip_a": 0.0}, "clip_a"), ({"clip_a": 1.5}, "clip_a"),
                                      ({"ranges": "static", "rotation": "hadamard"}, "static")])
def test_config_rejects_bad_levers(kw, field):
    with pytest.raises(ConfigError, match=field):
        QuantConfig(**kw)


def test_walsh_hadamard_factors_are_sylvester_and_compose_by_kronecker():
    from scipy.linalg import hadamard

    assert torch.equal(sylvester(64), torch.from_numpy(hadamard(64)).to(torch.float64))
    assert torch.equal(sylvester(512), torch.kron(sylvester(8), sylvester(64)))  # what makes the transform fast
    rot = HadamardRotation(512)
    R = rot.apply(torch.eye(512, dtype=torch.float64))
    torch.testing.assert_close(R, rot.signs[:, None] * sylvester(512) / 512**0.5, rtol=0, atol=1e-15)


@pytest.mark.parametrize("n", [32, 352, 576, 1536])  # 2^5; 11 x 32 (tiny-llama); 9 x 64, 3 x 512 (SmolLM2)
def test_hadamard_rotation_is_orthogonal_and_spreads(n, rng):
    rot = HadamardRotation(n, seed=3)
    eye = torch.eye(n, dtype=torch.float64)
    R = rot.apply(eye)  # row i: e_i R
    torch.testing.assert_close(R @ R.T, eye, rtol=0, atol=1e-13)
    assert float(R.abs().max()) <= (2 / n) ** 0.5 + 1e-12  # a one-hot outlier lands on every feature
    w = torch.randn(5, n, generator=rng, dtype=torch.float64)
    torch.testing.assert_close(rot.invert(rot.apply(w)), w, rtol=0, atol=1e-13)  # W' R^T == W
    x = torch.randn(4, n, generator=rng, dtype=torch.float64)
    torch.testing.assert_close(rot.apply(x) @ rot.apply(w).T, x @ w.T, rtol=0, atol=1e-12)  # exact in float
    assert torch.equal(rot.apply(x), HadamardRotation(n, seed=3).apply(x))  # the seed fixes R
    assert not torch.equal(rot.apply(x), HadamardRotation(n, seed=4).apply(x))


def test_rotation_tames_outlier_features(rng):
    """Inputs with a few huge features, as real LLM activations have: rotated, they quantize far better."""
    w = torch.randn(48, 96, generator=rng, dtype=torch.float64)
    x = torch.randn(32, 96, generator=rng, dtype=torch.float64)
    x[:, [5, 70]] *= 100.0
    g = torch.randn(32, 48, generator=rng, dtype=torch.float64)

    def errors(rotation):
        qw = quantize_weight(w if rotation is None else rotation.apply(w), 8)
        op = integer_op(qw.q, qw.scale, 8, 8, rotation=rotation)
        return float((op.forward(x) - x @ w.T).norm() / (x @ w.T).norm()), float((op.backward(g) - g @ w).norm() / (g @ w).norm())

    (f0, b0), (f1, b1) = errors(None), errors(HadamardRotation(96))
    assert f1 < 0.6 * f0  # measured: 1.25% -> 0.68%, what is left is mostly the 8-bit weights' error
    assert b1 < 1.5 * b0  # backward is un-rotated exactly: its error stays that of 8-bit quantization


@pytest.mark.parametrize("clip", [1.0, 0.9])
def test_rotated_op_is_bit_exact_integer_arithmetic(clip, rng):
    """The worker's product is the same integer matmul; only the client's encode and decode change."""
    rot = HadamardRotation(80, seed=1)
    w, x = torch.randn(48, 80, generator=rng), torch.randn(7, 80, generator=rng, dtype=torch.float64)
    g = torch.randn(7, 48, generator=rng, dtype=torch.float64)
    qw = quantize_weight(rot.apply(w), 8)
    op = integer_op(qw.q, qw.scale, 10, 9, rotation=rot, clip_a=clip)
    tq = quantize_activations(rot.apply(x), 10, clip)
    W = qw.q.numpy().astype(np.int64)
    raw = tq.q.numpy().astype(np.int64) @ W.T
    acc = raw - tq.zero_point.numpy().astype(np.int64) * W.sum(axis=1)[None, :]
    y = acc.astype(np.float64) * tq.scale.numpy() * qw.scale.numpy().astype(np.float64)[None, :]
    assert np.array_equal(op.forward(x).numpy(), y)
    gq = quantize_gradients(g * qw.scale.to(torch.float64), 9)
    dx = rot.invert(torch.from_numpy((gq.q.numpy().astype(np.int64) @ W).astype(np.float64)) * gq.scale)
    assert np.array_equal(op.backward(g).numpy(), dx.numpy())


def test_clipping_saturates_the_tail_and_refines_the_rest():
    x = torch.tensor([[-1.0, 0.0, 0.5, 1.0, 10.0]], dtype=torch.float64)
    full, clipped = quantize_activations(x, 8), quantize_activations(x, 8, clip=0.5)
    assert float(clipped.scale) == pytest.approx(float(full.scale) / 2)
    recon = (clipped.q - clipped.zero_point) * clipped.scale
    assert float(recon[0, -1]) == pytest.approx(5.0, abs=float(clipped.scale))  # 10 saturates at 0.5 x max
    assert float(recon[0, 1]) == 0.0  # zero stays exact
