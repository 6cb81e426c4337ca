"""Settings of a SHE-LoRA federation: one frozen dataclass, validated once."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from hetune.errors import ConfigError

METHODS = ("she-lora", "flexlora", "full-he", "maskcrypt")
# Largest total log2(q) for 128-bit classical security with a ternary secret
# (HomomorphicEncryption.org standard, Table 1; SEAL's CoeffModulus::MaxBitCount).
MAX_LOGQ_128 = {4096: 109, 8192: 218, 16384: 438, 32768: 881}


@dataclass(frozen=True)
class CkksParams:
    """CKKS parameters. Default: N=8192, q = 60+40+60 = 160 bits (<= 218: 128-bit secure).

    The server computes ciphertext x plaintext products (rotations consume no level),
    so one 40-bit level is enough; the scale equals that prime so a product rescales
    back to ~2^40.
    """

    poly_modulus_degree: int = 8192
    coeff_mod_bit_sizes: tuple[int, ...] = (60, 40, 60)
    scale_bits: int = 40

    def __post_init__(self):
        if self.poly_modulus_degree not in MAX_LOGQ_128:
            raise ConfigError(
                f"ckks.poly_modulus_degree={self.poly_modulus_degree} is not supported",
                f"use one of {sorted(MAX_LOGQ_128)} (8192 is the reference's choice)",
            )
        if len(self.coeff_mod_bit_sizes) < 3:
            raise ConfigError(
                f"ckks.coeff_mod_bit_sizes={self.coeff_mod_bit_sizes} has fewer than 3 primes",
                "the server multiplies once: use e.g. (60, 40, 60)",
            )
        total, limit = sum(self.coeff_mod_bit_sizes), MAX_LOGQ_128[self.poly_modulus_degree]
        if total > limit:
            raise ConfigError(
                f"ckks.coeff_mod_bit_sizes sum to {total} bits, above {limit} for N={self.poly_modulus_degree}",
                "that is below 128-bit security; use fewer or smaller primes, or a larger N",
            )
        if not 20 <= self.scale_bits <= min(self.coeff_mod_bit_sizes[1:-1]):
            raise ConfigError(
                f"ckks.scale_bits={self.scale_bits} must lie in [20, {min(self.coeff_mod_bit_sizes[1:-1])}]",
                "set the scale to the middle primes' size (40 with (60, 40, 60)) so a product rescales exactly",
            )

    @property
    def slots(self) -> int:
        return self.poly_modulus_degree // 2


def parse_ints(name: str, text: str) -> tuple[int, ...]:
    """"2,4,8" -> (2, 4, 8), for the CLI's and Flower's run-config lists."""
    try:
        return tuple(int(v) for v in str(text).split(",") if v.strip())
    except ValueError:
        raise ConfigError(f"{name} {text!r} is not a comma-separated list of integers", f"write e.g. {name} 2,4,8") from None


@dataclass(frozen=True)
class SheLoraConfig:
    """One federated run. ``ranks`` and ``budgets`` (encrypted columns per layer) are cycled over clients."""

    out: Path
    clients: int = 10
    rounds: int = 5
    model: str = "micro-llama"
    method: str = "she-lora"
    ranks: tuple[int, ...] = (2, 4, 8)
    budgets: tuple[int, ...] = (1, 2, 4)
    alpha: float = 0.3
    seed: int = 0
    local_steps: int = 30
    batch_size: int = 32
    lr: float = 1e-2
    targets: tuple[str, ...] = ("q_proj", "v_proj")
    calibration_samples: int = 64
    test_fraction: float = 0.2
    max_samples: int = 0  # 0: the whole digits set (1797 images)
    ckks: CkksParams = field(default_factory=CkksParams)
    cpus_per_client: float = 1.0
    verbose: bool = False

    def __post_init__(self):
        checks = [
            (self.clients >= 1, "clients", self.clients, "use at least 1 client"),
            (self.rounds >= 1, "rounds", self.rounds, "use at least 1 round"),
            (self.method in METHODS, "method", self.method, f"use one of {', '.join(METHODS)}"),
            (len(self.ranks) > 0 and all(r >= 1 for r in self.ranks), "ranks", self.ranks, "give positive ranks, e.g. 2,4,8"),
            (len(self.budgets) > 0 and all(k >= 1 for k in self.budgets), "budgets", self.budgets,
             "give at least one encrypted column per layer per client, e.g. 1,2,4"),
            (self.alpha > 0, "alpha", self.alpha, "Dirichlet alpha must be > 0 (0.3: non-IID, 100: near IID)"),
            (self.local_steps >= 1, "local_steps", self.local_steps, "use at least 1 local step"),
            (self.batch_size >= 1, "batch_size", self.batch_size, "use at least 1"),
            (self.lr > 0, "lr", self.lr, "use a positive learning rate, e.g. 1e-2"),
            (len(self.targets) > 0, "targets", self.targets, "name at least one linear, e.g. q_proj,v_proj"),
            (self.calibration_samples >= 1, "calibration_samples", self.calibration_samples, "use at least 1"),
            (0 < self.test_fraction < 1, "test_fraction", self.test_fraction, "use a fraction in (0, 1), e.g. 0.2"),
            (self.max_samples == 0 or self.max_samples >= 2 * self.clients, "max_samples", self.max_samples,
             "use 0 (all) or at least 2 samples per client"),
            (self.cpus_per_client > 0, "cpus_per_client", self.cpus_per_client, "use a positive number of CPUs"),
        ]
        for ok, name, value, hint in checks:
            if not ok:
                raise ConfigError(f"{name}={value!r} is invalid", hint)

    def rank_of(self, client: int) -> int:
        return self.ranks[client % len(self.ranks)]

    def budget_of(self, client: int) -> int:
        return self.budgets[client % len(self.budgets)]

    @property
    def encrypts(self) -> bool:
        return self.method != "flexlora"
