"""Settings of a SHE-LoRA federation: one frozen dataclass, validated once."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from hetune.errors import ConfigError

METHODS = ("she-lora", "flexlora", "full-he", "maskcrypt")
# references run without Flower or a server: one trainer on all data, or each client alone
REFERENCES = ("centralized", "local-only")
TASKS = ("digits", "knowledge", "text")
# Per-task defaults of the fields left as None: the digits toy trains a classifier head
# on 65-token images; the causal-LM tasks train on short documents of a real model.
TASK_DEFAULTS = {
    "digits": {"clients": 10, "local_steps": 30, "batch_size": 32, "lr": 1e-2},
    "knowledge": {"clients": 3, "local_steps": 10, "batch_size": 4, "lr": 3e-3},
    "text": {"clients": 3, "local_steps": 10, "batch_size": 4, "lr": 3e-3},
}
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
    """One federated run. ``ranks`` and ``budgets`` (encrypted columns per layer) are cycled over clients.

    ``task``: ``digits`` (the toy: a classifier on 8x8 scans), ``knowledge`` or ``text``
    (causal-LM loss on :func:`hetune.data.federated.make_federated_text`). Fields left
    None take the task's value from ``TASK_DEFAULTS``.
    """

    out: Path
    clients: int | None = None
    rounds: int = 5
    model: str = "micro-llama"
    task: str = "digits"
    method: str = "she-lora"
    ranks: tuple[int, ...] = (2, 4, 8)
    budgets: tuple[int, ...] = (1, 2, 4)
    alpha: float = 0.3
    seed: int = 0
    local_steps: int | None = None
    batch_size: int | None = None
    lr: float | None = None
    targets: tuple[str, ...] = ("q_proj", "v_proj")
    calibration_samples: int = 64
    test_fraction: float = 0.2
    max_samples: int = 0  # 0: the whole digits set (1797 images)
    seq_len: int = 48  # causal-LM tasks: tokens per training document (longer ones are cut)
    max_docs: int = 0  # causal-LM tasks: training documents per client (0: all)
    eval_docs: int = 32  # causal-LM tasks: held-out documents for the eval loss
    ckks: CkksParams = field(default_factory=CkksParams)
    cpus_per_client: float = 1.0
    verbose: bool = False

    def __post_init__(self):
        if self.task not in TASKS:
            raise ConfigError(f"task={self.task!r} is invalid", f"use one of {', '.join(TASKS)}")
        for name, value in TASK_DEFAULTS[self.task].items():
            if getattr(self, name) is None:
                object.__setattr__(self, name, value)
        checks = [
            (self.clients >= 1, "clients", self.clients, "use at least 1 client"),
            (self.rounds >= 1, "rounds", self.rounds, "use at least 1 round"),
            (self.method in METHODS + REFERENCES, "method", self.method, f"use one of {', '.join(METHODS + REFERENCES)}"),
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
            (self.seq_len >= 8, "seq_len", self.seq_len, "use at least 8 tokens per document"),
            (self.max_docs >= 0, "max_docs", self.max_docs, "use 0 (all) or a positive number of documents"),
            (self.eval_docs >= 1, "eval_docs", self.eval_docs, "use at least 1 held-out document"),
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
        return self.method not in ("flexlora",) + REFERENCES

    @property
    def causal_lm(self) -> bool:
        """The knowledge and text tasks: LoRA on the model's own LM loss, no classifier head."""
        return self.task != "digits"
