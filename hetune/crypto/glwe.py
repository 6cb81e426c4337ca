"""Concrete ML's GLWE matmul (concrete-ml-extensions) as the ``glwe`` scheme: kept for comparison.

Encrypted integer matrix (rows padded to the 2048-coefficient polynomial) times a clear
integer matrix; results are modulus-switched and packed with the compression key.
Integers of either sign travel as two's-complement uint64, like Concrete ML does.
Results are approximate (absolute noise of a few tens); callers assert a bound. Each
output value costs a packing key-switch (about 6-7 ms on 2 cores): the batched RLWE
scheme (:mod:`hetune.crypto.rlwe`) is the default. The data owner's keys are in
:mod:`hetune.crypto.glwe_keys`.
"""

from __future__ import annotations

import numpy as np
import torch

from hetune.crypto.glwe_params import DEFAULT_PARAM_SET, PARAM_SETS, param_set as glwe_param_set
from hetune.crypto.scheme import ParamSet, PayloadError, Scheme

NAME = "glwe"

# Absolute error bound on a decrypted result (default parameters). Measured here: noise
# std 13..21 and max |err| 71 over 1,536 outputs of k = 128..2048 products (the spec
# reports up to 85). 160 is about 8 standard deviations: a correct run does not exceed it.
RESULT_NOISE_BOUND = 160


def _fhext():
    try:
        import concrete_ml_extensions as fhext
    except ImportError as err:  # pragma: no cover - part of the pinned stack
        from hetune.errors import ConfigError

        raise ConfigError(
            "concrete-ml-extensions is not installed", "reinstall hetune with the README's command"
        ) from err
    return fhext


def _guard(what: str, fn):
    """Run an extension call; its pyo3 panics (BaseException) become a PayloadError."""
    try:
        return fn()
    except BaseException as err:  # noqa: BLE001 - pyo3 panics derive from BaseException
        if isinstance(err, (KeyboardInterrupt, SystemExit)):
            raise
        raise PayloadError(f"{what} could not be deserialized or used (corrupt payload?)") from None


class GlweScheme(Scheme):
    name = NAME
    param_sets = PARAM_SETS
    default_param_set = DEFAULT_PARAM_SET

    def params(self, name: str) -> ParamSet:
        if name not in PARAM_SETS:
            raise self.unknown_set(name)
        gp = glwe_param_set(name)
        return ParamSet(
            scheme=NAME, name=name, security=gp.security, security_source="Zama lattice-estimator curves (see glwe_params)",
            budget_bits=gp.budget_bits, exact=False, noise_bound=RESULT_NOISE_BOUND,
            session_key_bytes=gp.compression_key_bytes, poly_size=gp.poly_size, max_weight_l2=None,
        )

    def open_session(self, params: ParamSet, key: bytes) -> object:
        if len(key) != params.session_key_bytes:
            raise PayloadError(f"a {NAME}/{params.name} compression key is {params.session_key_bytes} bytes, got {len(key)}")
        return _guard("the compression key", lambda: _fhext().CpuCompressionKey.deserialize(key))

    def request_bytes(self, params: ParamSet, rows: int, cols: int) -> int:
        return glwe_param_set(params.name).ciphertext_bytes(rows, cols)

    def check_request(self, params: ParamSet, body: bytes, rows: int, cols: int) -> None:
        expected = self.request_bytes(params, rows, cols)
        if len(body) != expected:
            raise PayloadError(f"a {rows}x{cols} {NAME}/{params.name} ciphertext is {expected} bytes, got {len(body)} (truncated, or another scheme?)", 422)

    def multiply(self, params: ParamSet, session: object, body: bytes, weight: torch.Tensor, device: str = "cpu") -> bytes:
        """Enc(X) (T, k) times W^T (k, n) -> compressed Enc(X W^T); ``session`` is the compression key."""
        clear = np.ascontiguousarray(weight.T.numpy().astype(np.int64).astype(np.uint64))
        fhext = _fhext()
        ciphertext = _guard("the ciphertext", lambda: fhext.EncryptedMatrix.deserialize(body))
        out = _guard("the ciphertext", lambda: fhext.matrix_multiplication(encrypted_matrix=ciphertext, data=clear, compression_key=session))
        return bytes(out.serialize())


SCHEME = GlweScheme()
