"""One frozen config for a run; defaults live here and nowhere else."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from hetune.errors import ConfigError

METHODS = ("sfprompt", "fl-full", "fl-lora", "fed-prompt", "split-fed", "local-only")
SPLIT_METHODS = ("sfprompt", "split-fed")  # the ones that talk to the body server
FAULTS = ("malformed", "disconnect")
# task -> the backbones it runs on; knowledge and text are causal-LM tasks (make_federated_text)
TASKS = {"digits": "vit", "topics": "llama", "knowledge": "llama", "text": "llama"}
LM_TASKS = ("knowledge", "text")
# Defaults of the settings that depend on the backbone: AdamW learning rates (soft prompts, tail,
# LoRA adapters, every weight) and local-loss epochs. The random toys learn from scratch at large
# steps. A pretrained LM is wrecked by them, and its local-loss path (block 1 straight into block
# 30 of SmolLM2) is likely a poor proxy for the real one: training on it raised the held-out loss at 9
# of the 10 settings tried (docs/benchmarks.md, the SFPrompt sweep), so a pretrained run skips it.
DEFAULTS = {"random": dict(lr=1e-2, tail_lr=1e-2, lora_lr=1e-2, full_lr=1e-3, local_epochs=1),
            "pretrained": dict(lr=1e-3, tail_lr=1e-3, lora_lr=1e-3, full_lr=5e-5, local_epochs=0)}


def parse_cut(text: str) -> tuple[int, int]:
    try:
        head, tail = (int(part) for part in text.split(":"))
    except ValueError:
        raise ConfigError(f"cut={text!r} is not HEAD:TAIL", "pass two block counts, e.g. --cut 1:1") from None
    return head, tail


@dataclass(frozen=True)
class SfpromptConfig:
    model: str = "tiny-vit"
    task: str | None = None  # None: digits (ViT), topics (random Llamas), knowledge (SmolLM2)
    method: str = "sfprompt"
    clients: int = 4
    rounds: int = 10
    cut: tuple[int, int] = (1, 1)  # blocks in head and tail; the body holds the rest
    prompts: int = 4  # soft prompt tokens (ignored by fl-full, which has none)
    gamma: float = 0.5  # EL2N: share of local samples kept for split fine-tuning
    local_epochs: int | None = None  # local-loss epochs (head -> tail) per round; None: DEFAULTS
    epochs: int = 1  # split / local fine-tuning epochs per round
    batch_size: int = 32
    lr: float | None = None  # AdamW, soft prompts; None: DEFAULTS
    tail_lr: float | None = None  # AdamW, tail (and the final norm, the classifier); None: DEFAULTS
    lora_lr: float | None = None  # AdamW, LoRA adapters (fl-lora); None: DEFAULTS
    full_lr: float | None = None  # AdamW, every weight (fl-full); None: DEFAULTS
    lora_rank: int = 8  # fl-lora: rank on all seven linears of every block
    alpha: float = 0.5  # Dirichlet non-IID split (digits, topics; the text tasks come split by topic / source)
    seq_len: int = 64  # text tasks: tokens kept per document
    max_docs: int = 0  # text tasks: training documents per client, 0 = all
    blocks: int = 0  # keep the backbone's first blocks only (0 = all): a truncated SmolLM2 for fast runs
    client_cpus: float = 1.0  # Ray CPUs per simulated client: more runs fewer clients at once (less memory)
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
        fam = models.family(self.model)
        if self.task is None:
            object.__setattr__(self, "task", "digits" if fam == "vit" else "knowledge" if self.model in models.PRETRAINED else "topics")
        if self.task not in TASKS:
            raise ConfigError(f"task={self.task!r} is unknown", f"use one of {', '.join(TASKS)}")
        if TASKS[self.task] != fam:
            usable = [t for t, f in TASKS.items() if f == fam]
            raise ConfigError(f"task={self.task} does not run on {self.model} (a {fam})", f"use --task {' or '.join(usable)}")
        if self.blocks < 0:
            raise ConfigError(f"blocks={self.blocks} must be >= 0", "pass 0 for the whole model")
        check_cut(self.model, self.cut, self.blocks)
        if self.task in LM_TASKS and self.cut[0] < 1 and self.method in SPLIT_METHODS:
            raise ConfigError(f"cut={self.cut[0]}:{self.cut[1]} would send token embeddings to the body server, "
                              "and an embedding maps back to its token by the nearest row",
                              "keep at least one block on the client: --cut 1:1")
        if self.client_cpus <= 0:
            raise ConfigError(f"client_cpus={self.client_cpus} must be > 0", "pass e.g. --client-cpus 2 to run one client at a time on 2 cores")
        if self.seq_len < 2 or self.max_docs < 0 or self.lora_rank < 1:
            raise ConfigError(f"seq_len={self.seq_len}, max_docs={self.max_docs}, lora_rank={self.lora_rank} are invalid",
                              "pass --seq-len >= 2, --max-docs >= 0 (0 = all), --lora-rank >= 1")
        defaults = DEFAULTS["pretrained" if self.model in models.PRETRAINED else "random"]
        for name, default in defaults.items():
            if getattr(self, name) is None:
                object.__setattr__(self, name, default)
        for name in ("clients", "rounds", "epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)} must be >= 1", f"pass a positive --{name.replace('_', '-')}")
        if self.local_epochs < 0:
            raise ConfigError(f"local_epochs={self.local_epochs} must be >= 0", "pass 0 to skip the local-loss update")
        if self.prompts < 0 or (self.prompts == 0 and self.method not in ("fl-full", "fl-lora")):
            raise ConfigError(f"prompts={self.prompts} must be >= 1 for {self.method}", "pass e.g. --prompts 4")
        if not 0 < self.gamma <= 1:
            raise ConfigError(f"gamma={self.gamma} must be in (0, 1]", "use e.g. 0.5 (keep the hardest half)")
        if self.alpha <= 0:
            raise ConfigError(f"alpha={self.alpha} must be > 0", "use e.g. 0.5 (non-IID) or 100 (near IID)")
        if min(self.lr, self.tail_lr, self.lora_lr, self.full_lr) <= 0:
            raise ConfigError(f"lr={self.lr}, tail_lr={self.tail_lr}, lora_lr={self.lora_lr}, full_lr={self.full_lr} must be > 0",
                              f"use e.g. {defaults['lr']}, {defaults['tail_lr']}, {defaults['lora_lr']} and {defaults['full_lr']}")
        for pid, fault in self.faults.items():
            if fault not in FAULTS or not 0 <= pid < self.clients:
                raise ConfigError(f"faults[{pid}]={fault!r} is invalid", f"partition ids 0..{self.clients - 1}, faults {FAULTS}")

    @property
    def n_prompts(self) -> int:
        return 0 if self.method in ("fl-full", "fl-lora") else self.prompts

    @property
    def trained(self) -> str:
        """What a client trains and FedAvg averages: "full" (every weight), "lora" (adapters) or "prompt" (prompts + tail)."""
        return {"fl-full": "full", "fl-lora": "lora"}.get(self.method, "prompt")

    def learning_rates(self) -> dict[str, float]:
        """AdamW's step per group of what :attr:`trained` names: the soft prompts and the rest (split.param_groups)."""
        if self.trained == "prompt":
            return {"prompts": self.lr, "rest": self.tail_lr}
        return {"rest": self.full_lr if self.trained == "full" else self.lora_lr}

    @property
    def lm(self) -> bool:
        return self.task in LM_TASKS

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
