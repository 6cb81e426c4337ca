"""The GLWE matmul primitive of concrete-ml-extensions, as Concrete ML's GLWE backend uses it.

Encrypted integer matrix (rows padded to the 2048-coefficient polynomial) times a clear
integer matrix; results are modulus-switched and packed with the compression key.
Integers of either sign travel as two's-complement uint64, like Concrete ML does.
Results are approximate (absolute noise of a few tens); callers assert a bound.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

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


def default_crypto_params() -> dict:
    """Concrete ML 1.9's default GLWE parameters (the ones its GLWELinearLayerExecutor uses)."""
    return json.loads(_fhext().default_params())


def result_budget_bits(params: dict | None = None) -> int:
    """Signed bits a decrypted result may use: |raw| < 2^(bits-1) decrypts exactly (+ noise)."""
    return int((params or default_crypto_params())["bits_reserved_for_computation"])


@dataclass
class GlweKeys:
    """Client-side keys. ``secret`` never leaves this object unless explicitly exported."""

    params: object  # fhext.MatmulCryptoParameters
    secret: object  # fhext.PrivateKey
    compression: object  # fhext.CpuCompressionKey (public, uploaded to the worker)
    poly_size: int  # results are packed this many values per GLWE
    param_set: str | None = None  # name in hetune.crypto.param_sets, told to the worker at session creation

    @classmethod
    def generate(cls, params: dict | None = None, param_set: str | None = None) -> "GlweKeys":
        """Keys for explicit ``params``, or for a named allow-listed ``param_set`` (default: Concrete ML's)."""
        fhext = _fhext()
        if param_set is not None:
            from hetune.crypto.param_sets import param_set as lookup
            from hetune.errors import ConfigError

            if params is not None:
                raise ConfigError("GlweKeys.generate got both params and param_set", "pass one of them")

            params = lookup(param_set).params
        params = params or default_crypto_params()
        p = fhext.MatmulCryptoParameters.deserialize(json.dumps(params))
        secret, compression = fhext.create_private_key(p)
        return cls(p, secret, compression, int(params["packing_ks_polynomial_size"]), param_set)

    def save(self, path: Path) -> None:
        """Write the secret key and its compression key, only when the user asks (``--save-key``).

        Layout: 8-byte little-endian secret length, secret key, compression key. The temp
        file is created 0600 before anything is written, then renamed into place.
        """
        from hetune.files import write_atomic

        secret, compression = bytes(self.secret.serialize()), self.compression_key_bytes()
        write_atomic(path, len(secret).to_bytes(8, "little") + secret + compression, mode=0o600)

    def compression_key_bytes(self) -> bytes:
        return bytes(self.compression.serialize())

    def encrypt(self, q: np.ndarray) -> object:
        """q: (T, k) integers -> EncryptedMatrix."""
        data = np.ascontiguousarray(np.asarray(q, dtype=np.int64).astype(np.uint64))
        return _fhext().encrypt_matrix(pkey=self.secret, crypto_params=self.params, data=data)

    @staticmethod
    def result_from_bytes(data: bytes) -> object:
        return _fhext().CompressedResultEncryptedMatrix.deserialize(data)

    def decrypt(self, result: object, n_cols: int) -> np.ndarray:
        valid_in_last = n_cols % self.poly_size or self.poly_size
        return _fhext().decrypt_matrix(result, self.secret, self.params, valid_in_last).astype(np.int64)


def load_compression_key(data: bytes) -> object:
    return _fhext().CpuCompressionKey.deserialize(data)


def ciphertext_from_bytes(data: bytes) -> object:
    return _fhext().EncryptedMatrix.deserialize(data)


def encrypted_matmul(ciphertext: object, weight: np.ndarray, compression_key: object) -> object:
    """Worker side: Enc(X) (T, k) times clear integer weight (k, n) -> compressed Enc(X W)."""
    data = np.ascontiguousarray(np.asarray(weight, dtype=np.int64).astype(np.uint64))
    return _fhext().matrix_multiplication(encrypted_matrix=ciphertext, data=data, compression_key=compression_key)
