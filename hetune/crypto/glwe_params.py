"""The allow-list of GLWE parameter sets (Concrete ML's scheme, registered as ``glwe``) a data owner may pick per session (its privacy level).

Each set is Concrete ML's default GLWE matmul parameters with a few fields changed,
checked here to encrypt, multiply and decrypt within the same noise bound as the
default (tests/test_privtuner_params.py). Security is the certified level of the weaker
of the two lattice instances a worker sees: the input GLWE ciphertexts (dimension
k*N, noise ``glwe_encryption_noise_distribution_stdev``) and the compression key
(dimension of the packing GLWE key, noise ``pks_noise_distrubution_stdev``); see
:mod:`hetune.crypto.security`.

- ``p80``: N = 1024; noise 2^-40 needs a 3 x 10-bit packing key-switch to stay accurate.
- ``p128``: Concrete ML's default (N = 2048).
- ``p192``: N = 2048 with noise 2^-35; an 8 x 4-bit packing key-switch keeps the noise down.
- ``p256``: N = 4096 (input rows pad to 4096 values; 512 MiB compression key).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from functools import lru_cache

from hetune.crypto.security import SecurityEstimate, lwe_security

DEFAULT_PARAM_SET = "p128"

# name -> fields changed from concrete-ml-extensions' default_params()
_OVERRIDES: dict[str, dict] = {
    "p80": {"polynomial_size": 1024, "packing_ks_polynomial_size": 1024,
            "glwe_encryption_noise_distribution_stdev": 2.0**-40, "pks_noise_distrubution_stdev": 2.0**-40,
            "packing_ks_level": 3, "packing_ks_base_log": 10},
    "p128": {},
    "p192": {"glwe_encryption_noise_distribution_stdev": 2.0**-35, "pks_noise_distrubution_stdev": 2.0**-35,
             "packing_ks_level": 8, "packing_ks_base_log": 4},
    "p256": {"polynomial_size": 4096, "packing_ks_polynomial_size": 4096},
}
PARAM_SETS = tuple(_OVERRIDES)

# Serialized sizes (bincode): a seeded input GLWE stores only its body at
# input_storage_ciphertext_modulus bits plus 88 bytes; the compression key is
# n_in * level * (k_out + 1) * N_out 64-bit words plus 80 bytes. Checked against real
# objects in the tests.
_GLWE_OVERHEAD_BYTES = 88
_KEY_OVERHEAD_BYTES = 80
_ROW_OVERHEAD_BYTES = 16  # EncryptedMatrix: 24 bytes, then 16 per row, around the GLWEs
_MATRIX_OVERHEAD_BYTES = 24


@dataclass(frozen=True)
class GlweParamSet:
    name: str
    params: dict  # the full JSON dict concrete-ml-extensions takes

    @property
    def poly_size(self) -> int:
        return int(self.params["polynomial_size"])

    @property
    def packing_poly_size(self) -> int:
        return int(self.params["packing_ks_polynomial_size"])

    @property
    def glwe_bytes(self) -> int:
        """Bytes of one serialized input GLWE ciphertext (one row chunk of poly_size values)."""
        return math.ceil(self.poly_size * self.params["input_storage_ciphertext_modulus"] / 8) + _GLWE_OVERHEAD_BYTES

    @property
    def budget_bits(self) -> int:
        return int(self.params["bits_reserved_for_computation"])

    def ciphertext_bytes(self, rows: int, cols: int) -> int:
        """Serialized EncryptedMatrix: each row split into ceil(cols / N) GLWEs, plus bincode length prefixes."""
        return _MATRIX_OVERHEAD_BYTES + rows * (_ROW_OVERHEAD_BYTES + math.ceil(cols / self.poly_size) * self.glwe_bytes)

    @property
    def compression_key_bytes(self) -> int:
        p = self.params
        n_in = p["encryption_glwe_dimension"] * p["polynomial_size"]
        words = n_in * p["packing_ks_level"] * (p["packing_ks_glwe_dimension"] + 1) * p["packing_ks_polynomial_size"]
        return 8 * words + _KEY_OVERHEAD_BYTES

    @property
    def security(self) -> SecurityEstimate:
        p = self.params
        inputs = lwe_security(p["encryption_glwe_dimension"] * p["polynomial_size"], p["glwe_encryption_noise_distribution_stdev"])
        key = lwe_security(p["packing_ks_glwe_dimension"] * p["packing_ks_polynomial_size"], p["pks_noise_distrubution_stdev"])
        return min(inputs, key, key=lambda s: s.bits)


@lru_cache(maxsize=None)
def _default_params_json() -> str:
    import concrete_ml_extensions as fhext

    return fhext.default_params()


def param_set(name: str) -> GlweParamSet:
    """The named set; a name outside the allow-list raises ConfigError."""
    if name not in _OVERRIDES:
        from hetune.errors import ConfigError

        raise ConfigError(f"GLWE parameter set {name!r} is not in the allow-list", f"choose one of {', '.join(PARAM_SETS)}")
    params = json.loads(_default_params_json())
    params.update(_OVERRIDES[name])
    return GlweParamSet(name, params)
