"""Concrete ML's GLWE matmul behind the scheme interface, against the integer reference.

512 output values in all (about 10 s on 2 cores at ~14 ms each, plus a 3 s keygen).
"""

import numpy as np
import pytest
import torch
from integer_op import integer_op

from hetune.crypto.glwe import RESULT_NOISE_BOUND, SCHEME
from hetune.crypto.keys import generate_keys, load_keys

pytestmark = pytest.mark.he


@pytest.fixture(scope="module")
def keys():
    return generate_keys("glwe")


def encrypted_matmul(keys, q, w_in_out) -> bytes:
    """Worker side through the interface: the scheme takes the weight as (n_out, n_in)."""
    session = SCHEME.open_session(keys.params, keys.session_key())
    return SCHEME.multiply(keys.params, session, keys.encrypt(q), torch.as_tensor(np.asarray(w_in_out)).T)


def test_budget_is_27_bits():
    assert SCHEME.params("p128").budget_bits == 27 and not SCHEME.params("p128").exact


def test_forward_and_backward_match_integer_reference(keys, compiled):
    spec = compiled.manifest.op("layers.0.o")
    op = compiled.tensors[spec.weight_key]
    lin = integer_op(op, compiled.tensors[spec.scale_key], 8, 8)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, lin.in_features, generator=gen)
    g = torch.randn(2, lin.out_features, generator=gen)

    # forward: Enc(X_q) @ W_q^T on the "worker", correction and rescale on the client
    tq = lin.encode_input(x)
    raw = keys.decrypt(encrypted_matmul(keys, tq.q.numpy(), lin.q.T.numpy()), 2, lin.out_features)
    ref = lin.raw_forward(tq.q).numpy().astype(np.int64)
    err = np.abs(raw - ref)
    assert err.max() <= RESULT_NOISE_BOUND
    assert (err > 0).any()  # it really went through (noisy) encryption
    y_he = lin.decode_output(torch.from_numpy(raw).to(torch.float64), tq)
    y_q = lin.forward(x)
    # noise in raw maps to at most bound * x_scale * w_scale in the float output
    assert ((y_he - y_q).abs() <= RESULT_NOISE_BOUND * tq.scale * lin.codec.scale.double()[None, :] + 1e-12).all()
    assert float((y_he - y_q).norm() / y_q.norm()) < 1e-2

    # backward: signed per-token gradients, Enc(G_q) @ W_q
    gq = lin.encode_grad(g)
    raw_b = keys.decrypt(encrypted_matmul(keys, gq.q.numpy(), lin.q.numpy()), 2, lin.in_features)
    ref_b = lin.raw_backward(gq.q).numpy().astype(np.int64)
    assert np.abs(raw_b - ref_b).max() <= RESULT_NOISE_BOUND
    dx_he = lin.decode_grad(torch.from_numpy(raw_b).to(torch.float64), gq)
    dx_q = lin.backward(g)
    assert ((dx_he - dx_q).abs() <= RESULT_NOISE_BOUND * gq.scale + 1e-12).all()
    assert float((dx_he - dx_q).norm() / dx_q.norm()) < 1e-2


def test_results_beyond_the_budget_wrap(keys):
    """Why the compile-time budget check exists: 2^26 and beyond decrypt to garbage."""
    x = np.full((1, 16), 255)
    w = np.zeros((16, 2), dtype=np.int64)
    w[:, 0] = (2**25) // (255 * 16)  # |raw| < 2^25: fine
    w[:, 1] = (2**27) // (255 * 16)  # |raw| ~ 2^27: wraps
    out = keys.decrypt(encrypted_matmul(keys, x, w), 1, 2)[0]
    ref = (x @ w)[0]
    assert abs(out[0] - ref[0]) <= RESULT_NOISE_BOUND
    assert abs(out[1] - ref[1]) > 2**20


def test_secret_key_is_not_in_the_compression_key(keys):
    secret = bytes(keys._secret.serialize())
    assert len(secret) > 1000
    public = keys.session_key()
    assert secret[-256:] not in public


def test_secret_key_file_is_0600(keys, tmp_path):
    import stat

    path = tmp_path / "glwe.key"
    keys.save(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    data = path.read_bytes()
    n = int.from_bytes(data[8:16], "little")
    assert data[:8].rstrip(b"\0") == b"p128" and data[16 : 16 + n] == bytes(keys._secret.serialize())
    assert not list(tmp_path.glob(".*.tmp"))
    again = load_keys(path, "glwe")
    x, w = np.full((1, 16), 3), np.ones((16, 2), dtype=np.int64)
    assert np.abs(again.decrypt(encrypted_matmul(keys, x, w), 1, 2) - x @ w).max() <= RESULT_NOISE_BOUND
