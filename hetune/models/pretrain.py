"""Make a small pretrained base offline: a built-in Llama trained in plain on stdlib sources.

Llama-3.2-1B cannot be downloaded here, and convergence on a random network says
little, so ``hetune pretrain`` trains a built-in config as a byte-level language model
on text nobody here wrote (the Python standard library), then saves a Hugging Face
model directory that every other command takes as ``--model DIR``.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from hetune.errors import ConfigError
from hetune.schedule import warmup_cosine


@dataclass(frozen=True)
class PretrainConfig:
    out: Path
    model: str = "tiny-llama"
    steps: int = 3000  # the documented full setting: 21 minutes measured on 2 cores
    seq_len: int = 128
    batch_size: int = 16
    lr: float = 3e-3
    warmup_steps: int = 100
    text_chars: int = 4_000_000
    seed: int = 0
    progress: bool = True

    def __post_init__(self) -> None:
        if self.steps < 1 or self.seq_len < 2 or self.batch_size < 1:
            raise ConfigError("steps, seq_len and batch_size must be positive (seq_len >= 2)", "check the pretrain options")


def pretrain(cfg: PretrainConfig) -> dict:
    from tqdm.auto import tqdm

    from hetune.data.corpus import stdlib_text
    from hetune.data.text import BlockSampler, pack
    from hetune.models.loading import load_model

    out = Path(cfg.out)
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"{out} already exists and is not empty", "choose another --out or remove it")
    loaded = load_model(cfg.model, seed=cfg.seed)
    model, tok = loaded.model, loaded.tokenizer
    text = stdlib_text(cfg.text_chars)
    blocks = pack([text[i : i + 4000] for i in range(0, len(text), 4000)], tok, cfg.seq_len)
    sampler = BlockSampler(blocks, cfg.batch_size, cfg.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.01, betas=(0.9, 0.95))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(cfg.warmup_steps, cfg.steps, min_ratio=0.1))
    model.train()
    losses = []
    bar = tqdm(range(cfg.steps), desc=f"pretrain {cfg.model}", unit="step", disable=not cfg.progress)
    for _ in bar:
        batch = sampler.next()
        loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    tmp = out.parent / f".{out.name}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return {"first_loss": losses[0], "final_loss": sum(losses[-20:]) / len(losses[-20:]), "steps": cfg.steps, "out": str(out)}
