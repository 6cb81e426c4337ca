"""The data owner's GLWE keys (Concrete ML's scheme, :mod:`hetune.crypto.glwe`).

The worker never imports this module (tests/test_layout.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from hetune.crypto.glwe import SCHEME, _fhext, _guard
from hetune.crypto.glwe_params import DEFAULT_PARAM_SET, PARAM_SETS, GlweParamSet, param_set as glwe_param_set
from hetune.crypto.scheme import ClientKeys
from hetune.errors import ConfigError
from hetune.files import write_atomic


class GlweKeys(ClientKeys):
    """Client-side keys: the secret, and the compression key the worker needs (uploaded per session)."""

    def __init__(self, gp: GlweParamSet, secret: object, compression: object, params: object):
        self.gp, self.params = gp, SCHEME.params(gp.name)
        self._secret, self.compression, self._crypto = secret, compression, params

    @classmethod
    def generate(cls, param_set: str | None = None) -> "GlweKeys":
        gp = glwe_param_set(param_set or DEFAULT_PARAM_SET)
        p = _fhext().MatmulCryptoParameters.deserialize(json.dumps(gp.params))
        secret, compression = _fhext().create_private_key(p)
        return cls(gp, secret, compression, p)

    def session_key(self) -> bytes:
        return bytes(self.compression.serialize())

    def save(self, path: Path) -> None:
        """Layout: set name (8 bytes), 8-byte little-endian secret length, secret, compression key; 0600."""
        secret = bytes(self._secret.serialize())
        write_atomic(Path(path), self.gp.name.encode().ljust(8, b"\0") + len(secret).to_bytes(8, "little")
                     + secret + self.session_key(), mode=0o600)

    def encrypt(self, q) -> bytes:
        """q: (T, k) integers -> serialized EncryptedMatrix (signed values as two's-complement uint64)."""
        data = np.ascontiguousarray(np.asarray(q, dtype=np.int64).astype(np.uint64))
        return bytes(_fhext().encrypt_matrix(pkey=self._secret, crypto_params=self._crypto, data=data).serialize())

    def decrypt(self, result: bytes, rows: int, cols: int) -> np.ndarray:
        fhext = _fhext()
        packed = self.gp.packing_poly_size
        matrix = fhext.CompressedResultEncryptedMatrix.deserialize(result)
        return fhext.decrypt_matrix(matrix, self._secret, self._crypto, cols % packed or packed).astype(np.int64)



def generate(param_set: str) -> GlweKeys:
    return GlweKeys.generate(SCHEME.resolve(param_set).name)


def load(path: Path) -> GlweKeys:
    data = Path(path).read_bytes()
    name = data[:8].rstrip(b"\0").decode(errors="replace")
    if name not in PARAM_SETS or len(data) < 16:
        raise ConfigError(f"{path} is not a hetune GLWE secret key", "pass the file written by --save-key")
    gp = glwe_param_set(name)
    n = int.from_bytes(data[8:16], "little")
    fhext = _fhext()
    secret_type = type(fhext.create_private_key(fhext.MatmulCryptoParameters.deserialize(json.dumps(gp.params)))[0])
    secret = _guard("the secret key", lambda: secret_type.deserialize(data[16 : 16 + n]))  # the class is not exported
    compression = _guard("the compression key", lambda: fhext.CpuCompressionKey.deserialize(data[16 + n :]))
    return GlweKeys(gp, secret, compression, fhext.MatmulCryptoParameters.deserialize(json.dumps(gp.params)))
