"""The GLWE scheme's parameter allow-list (privacy levels): security estimates, sizes, real encryption, the worker.

Real-encryption tests use p80 and p128 (key generation 1 s and 4 s); p192 and p256
(512 MiB keys, 12-20 s key generation) are in the slow tier.
"""

import math

import numpy as np
import pytest
from fastapi.testclient import TestClient

import torch

from hetune.crypto.glwe import RESULT_NOISE_BOUND, SCHEME
from hetune.crypto.glwe_params import DEFAULT_PARAM_SET, PARAM_SETS, param_set
from hetune.crypto.keys import generate_keys
from hetune.crypto.security import CURVES, lwe_security, min_log2_sigma
from hetune.errors import ConfigError


def test_security_levels_of_the_allow_list():
    bits = {name: param_set(name).security.bits for name in PARAM_SETS}
    assert bits == {"p80": 80, "p128": 128, "p192": 192, "p256": 256}
    assert param_set("p256").security.extrapolated and not param_set("p128").security.extrapolated
    assert DEFAULT_PARAM_SET == "p128" and param_set("p128").params["polynomial_size"] == 2048


def test_security_estimate_is_falsifiable():
    # Concrete ML's default: 2^-48.32 at n = 2048 is above the 128-bit curve (-52.0), below the 192-bit one (-35.2)
    assert min_log2_sigma(128, 2048) == pytest.approx(-52.0, abs=0.05)
    assert min_log2_sigma(192, 2048) == pytest.approx(-35.23, abs=0.05)
    assert lwe_security(2048, 2.0**-53).bits == 80  # less noise, less security
    assert lwe_security(1024, 2.0**-48).bits == 0  # below every curve
    assert lwe_security(4096, 2.0**-62).bits == 192  # the 2^-62 floor applies at large n
    for level in CURVES:  # more noise or more dimension never lowers the level
        n = 1500
        s = 2.0 ** min_log2_sigma(level, n)
        assert lwe_security(n, s).bits >= level and lwe_security(n + 500, s).bits >= level
        assert lwe_security(n, s / 4).bits < level


def test_unknown_param_set_is_refused():
    with pytest.raises(ConfigError, match="not in the allow-list|not allow-listed"):
        param_set("p512")


def _check_set(name):
    keys = generate_keys("glwe", name)
    ps = param_set(name)
    assert len(keys.session_key()) == ps.compression_key_bytes == keys.params.session_key_bytes
    rng = np.random.default_rng(0)
    x, w = rng.integers(0, 256, (2, 300)), rng.integers(-127, 128, (300, 48))
    ct = keys.encrypt(x)
    assert len(ct) == 24 + 2 * (16 + math.ceil(300 / ps.poly_size) * ps.glwe_bytes) == SCHEME.request_bytes(keys.params, 2, 300)
    session = SCHEME.open_session(keys.params, keys.session_key())
    raw = keys.decrypt(SCHEME.multiply(keys.params, session, ct, torch.from_numpy(w).T), 2, 48)
    err = np.abs(raw - x @ w)
    assert err.max() <= RESULT_NOISE_BOUND and err.max() > 0
    return keys


@pytest.mark.he
@pytest.mark.parametrize("name", ["p80", "p128"])
def test_param_set_encrypts_within_the_noise_bound(name):
    _check_set(name)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["p192", "p256"])
def test_large_param_sets_encrypt_within_the_noise_bound(name):
    _check_set(name)


@pytest.mark.he
def test_worker_sessions_carry_their_param_set(micro_bundle):
    from hetune.compile.bundle import load_bundle
    from hetune.protocols.hybrid_lora.worker.server import ServeConfig, create_app

    bundle = load_bundle(micro_bundle)
    client = TestClient(create_app(bundle, ServeConfig(max_sessions=4, max_rows=8)))
    assert client.get("/v2/info").json()["schemes"]["glwe"]["param_sets"] == list(PARAM_SETS)
    low = generate_keys("glwe", "p80")
    glwe = {"scheme": "glwe"}
    s = client.post("/v2/sessions", params={**glwe, "param_set": "p80"}, content=low.session_key())
    assert s.status_code == 201 and s.json()["param_set"] == "p80" and s.json()["scheme"] == "glwe"
    auth = {"authorization": f"Bearer {s.json()['token']}"}
    q = np.random.default_rng(1).integers(0, 256, (1, 32))
    body = low.encrypt(q)
    r = client.post(f"/v2/sessions/{s.json()['session_id']}/ops/layers.1.o/forward", params={"rows": 1, "cols": 32}, content=body, headers=auth)
    assert r.status_code == 200
    exact = q @ bundle.tensors["layers.1.o.weight"].numpy().astype(np.int64).T
    assert np.abs(low.decrypt(r.content, 1, 32) - exact).max() <= RESULT_NOISE_BOUND
    # a p80 key cannot pose as p128, an unknown set is refused, and a p128 session refuses p80 ciphertexts
    assert client.post("/v2/sessions", params={**glwe, "param_set": "p128"}, content=low.session_key()).status_code in (400, 413)
    assert client.post("/v2/sessions", params={**glwe, "param_set": "p999"}, content=b"x").status_code == 422
    mid = generate_keys("glwe", "p128")
    s2 = client.post("/v2/sessions", params={**glwe, "param_set": "p128"}, content=mid.session_key()).json()
    r2 = client.post(f"/v2/sessions/{s2['session_id']}/ops/layers.1.o/forward", params={"rows": 1, "cols": 32}, content=body,
                     headers={"authorization": f"Bearer {s2['token']}"})
    assert r2.status_code == 422 and "bytes" in r2.json()["error"]


@pytest.mark.he
@pytest.mark.parametrize("scheme,name", [("rlwe", "p128"), ("glwe", "p80")])
def test_measure_fits_positive_costs_from_real_timings(scheme, name):
    """The fit goes through the scheme interface only: the same code measures either scheme."""
    from hetune.crypto.registry import get_scheme
    from hetune.protocols.privtuner.costs import CostModel, measure_param_set, per_sample

    params = get_scheme(scheme).params(name)
    costs, extra = measure_param_set(scheme, name, shapes=((2, 32, 16), (1, 1500, 8), (16, 8, 2)))
    assert costs.name == name and extra["keygen_s"] > 0
    assert extra["max_abs_error"] <= params.noise_bound and (extra["max_abs_error"] == 0) == params.exact
    assert costs.result_ratio > 0 and costs.client_s_per_request + costs.enc_s_per_byte > 0
    one = per_sample(CostModel(scheme, 2.0, {name: costs}, {}), name, "micro-llama", 16, batch=2)
    assert min(one.client_gcycles, one.server_gcycles, one.upload_mbit, one.download_mbit) > 0
    assert one.security_bits == params.security.bits and one.key_bytes == params.session_key_bytes
