"""Quantization settings for the outsourced linear layers."""

from __future__ import annotations

from dataclasses import dataclass

from hetune.errors import ConfigError

MIN_BITS, MAX_BITS = 2, 16
SCHEMES = ("dynamic", "static")


@dataclass(frozen=True)
class QuantConfig:
    """Bit widths of the worker's integer matmul.

    bits_w: signed weights, symmetric, one scale per output channel (Brevitas).
    bits_a: activations, unsigned, asymmetric, one scale and zero point per token.
    bits_g: output gradients, signed, symmetric, one scale per token.
    accept_overflow_risk: compile even if the worst case can exceed the GLWE budget.
    scheme: "dynamic" (per-channel weights, per-token inputs: the default, what converges) or
        "static" (one weight scale per tensor, input and gradient ranges fixed at compile
        time on calibration data): kept only to reproduce Concrete ML's ablation.
    """

    bits_w: int = 8
    bits_a: int = 8
    bits_g: int = 8
    accept_overflow_risk: bool = False
    scheme: str = "dynamic"

    def __post_init__(self) -> None:
        if self.scheme not in SCHEMES:
            raise ConfigError(f"scheme={self.scheme!r} is unknown", f"choose one of {', '.join(SCHEMES)}")
        for field in ("bits_w", "bits_a", "bits_g"):
            value = getattr(self, field)
            if not isinstance(value, int) or isinstance(value, bool) or not MIN_BITS <= value <= MAX_BITS:
                raise ConfigError(
                    f"{field}={value!r} is out of range",
                    f"choose an integer bit width between {MIN_BITS} and {MAX_BITS} (8 is the default)",
                )
