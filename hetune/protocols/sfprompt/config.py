"""One frozen config for a run; defaults live here and nowhere else."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from hetune.errors import ConfigError

METHODS = ("sfprompt", "fl-full", "fed-prompt", "split-fed", "local-only")
SPLIT_METHODS = ("sfprompt", "split-fed")  # the ones that talk to the body server
FAULTS = ("malformed", "disconnect")


def parse_cut(text: str) -> tuple[int, int]:
    try:
        head, tail = (int(part) for part in text.split(":"))
    except ValueError:
        raise ConfigError(f"cut={text!r} is not HEAD:TAIL", "pass two block counts, e.g. --cut 1:1") from None
    return head, tail


@dataclass(frozen=True)
class SfpromptConfig:
    model: str = "tiny-vit"
    method: str = "sfprompt"
    clients: int = 4
    rounds: int = 10
    cut: tuple[int, int] = (1, 1)  # blocks in head and tail; the body holds the rest
    prompts: int = 4  # soft prompt tokens (ignored by fl-full, which has none)
    gamma: float = 0.5  # EL2N: share of local samples kept for split fine-tuning
    local_epochs: int = 1  # local-loss epochs (head -> tail) per round
    epochs: int = 1  # split / local fine-tuning epochs per round
    batch_size: int = 32
    lr: float = 1e-2  # AdamW, prompts and tail
    full_lr: float = 1e-3  # AdamW, every weight (fl-full)
    alpha: float = 0.5  # Dirichlet non-IID split
    seed: int = 0
    out: Path | None = None
    # Test hooks: partition id -> "malformed" (update with a wrong shape) or "disconnect" (body link cut mid-round).
    faults: dict[int, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        from hetune.protocols.sfprompt import models
        from hetune.protocols.sfprompt.split import check_cut

        if self.method not in METHODS:
            raise ConfigError(f"method={self.method!r} is unknown", f"use one of {', '.join(METHODS)}")
        if self.model not in models.TRAINABLE_MODELS:
            raise ConfigError(f"model={self.model!r} cannot be trained here",
                              f"use one of {', '.join(models.TRAINABLE_MODELS)} (vit-b16 / vit-l16 are for accounting only)")
        check_cut(self.model, self.cut)
        for name in ("clients", "rounds", "epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)} must be >= 1", f"pass a positive --{name.replace('_', '-')}")
        if self.local_epochs < 0:
            raise ConfigError(f"local_epochs={self.local_epochs} must be >= 0", "pass 0 to skip the local-loss update")
        if self.prompts < 0 or (self.prompts == 0 and self.method not in ("fl-full",)):
            raise ConfigError(f"prompts={self.prompts} must be >= 1 for {self.method}", "pass e.g. --prompts 4")
        if not 0 < self.gamma <= 1:
            raise ConfigError(f"gamma={self.gamma} must be in (0, 1]", "use e.g. 0.5 (keep the hardest half)")
        if self.alpha <= 0:
            raise ConfigError(f"alpha={self.alpha} must be > 0", "use e.g. 0.5 (non-IID) or 100 (near IID)")
        if self.lr <= 0 or self.full_lr <= 0:
            raise ConfigError(f"lr={self.lr}, full_lr={self.full_lr} must be > 0", "use e.g. 1e-2 and 1e-3")
        for pid, fault in self.faults.items():
            if fault not in FAULTS or not 0 <= pid < self.clients:
                raise ConfigError(f"faults[{pid}]={fault!r} is invalid", f"partition ids 0..{self.clients - 1}, faults {FAULTS}")

    @property
    def n_prompts(self) -> int:
        return 0 if self.method == "fl-full" else self.prompts

    @property
    def full(self) -> bool:
        return self.method == "fl-full"

    def to_dict(self) -> dict:
        d = asdict(self)
        d["out"] = str(self.out) if self.out else None
        d["cut"] = list(self.cut)
        d["faults"] = {str(k): v for k, v in self.faults.items()}
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "SfpromptConfig":
        d = dict(d)
        d["out"] = Path(d["out"]) if d.get("out") else None
        d["cut"] = tuple(d["cut"])
        d["faults"] = {int(k): v for k, v in d.get("faults", {}).items()}
        return cls(**d)
