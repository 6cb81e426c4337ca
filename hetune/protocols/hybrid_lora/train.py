"""``hetune train``: the data owner's private LoRA loop, one readable function.

The same loop runs on every backend; only ``build_private_model`` differs. Checkpoints
hold the adapter (peft ``save_pretrained``), optimizer, scheduler, RNG states and the
data position, written atomically, so ``--resume`` continues exactly and a worker that
goes away mid-step leaves the last checkpoint intact.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from hetune.errors import ConfigError, WorkerError
from hetune.protocols.hybrid_lora.client import LoraSettings, PrivateModel, build_private_model
from hetune.schedule import warmup_cosine


@dataclass(frozen=True)
class TrainConfig:
    model: str
    data: tuple[str, ...]
    out: Path
    backend: str = "quantized"
    bundle: Path | None = None
    workers: tuple[str, ...] = ()
    text_field: str = "text"
    seq_len: int = 64
    batch_size: int = 4
    grad_accum: int = 1
    steps: int = 100
    lr: float = 1e-3
    warmup_steps: int = 10
    min_lr_ratio: float = 0.1  # cosine decay from lr to lr * min_lr_ratio
    weight_decay: float = 0.0
    clip_norm: float = 1.0
    eval_every: int = 50
    eval_fraction: float = 0.1  # share of packed blocks held out for eval loss
    eval_batches: int = 4
    save_every: int = 50
    lora: LoraSettings = field(default_factory=LoraSettings)
    seed: int = 0
    save_key: Path | None = None  # write the GLWE secret key here (0600); never written otherwise
    param_set: str | None = None  # allow-listed GLWE parameter set (privacy level); None: Concrete ML's default
    progress: bool = True

    def __post_init__(self) -> None:
        for name in ("seq_len", "batch_size", "grad_accum", "steps", "eval_every", "save_every", "eval_batches"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)} must be >= 1", f"pass a positive --{name.replace('_', '-')}")
        if not 0 < self.eval_fraction < 1:
            raise ConfigError(f"eval_fraction={self.eval_fraction} must be in (0, 1)", "use e.g. 0.1")
        if self.lr <= 0:
            raise ConfigError(f"lr={self.lr} must be > 0", "use e.g. 1e-3 for LoRA")
        if self.param_set is not None:
            from hetune.crypto.param_sets import PARAM_SETS

            if self.param_set not in PARAM_SETS:
                raise ConfigError(f"param_set={self.param_set!r} is not an allow-listed GLWE parameter set",
                                  f"pass --param-set one of {', '.join(PARAM_SETS)} (see `hetune plan params`)")
            if self.backend not in ("encrypted", "remote"):
                raise ConfigError(f"--param-set applies to the encrypted and remote backends, not {self.backend!r}",
                                  "drop --param-set or use --backend remote")


def _rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])


def save_checkpoint(out: Path, step: int, pm: PrivateModel, optimizer, scheduler, sampler, cfg: TrainConfig) -> Path:
    """out/checkpoints/step-N, written to a temp dir then renamed; out/checkpoints/latest names it."""
    root = out / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final, tmp = root / f"step-{step}", root / f".step-{step}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    pm.model.save_pretrained(tmp / "adapter")
    torch.save({"step": step, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "rng": _rng_state(), "data": sampler.state(), "config": _config_dict(cfg)}, tmp / "trainer_state.pt")
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    latest_tmp = root / ".latest.tmp"
    latest_tmp.write_text(final.name)
    os.replace(latest_tmp, root / "latest")
    return final


def latest_checkpoint(out: Path) -> Path | None:
    pointer = out / "checkpoints" / "latest"
    return out / "checkpoints" / pointer.read_text().strip() if pointer.is_file() else None


def read_metrics(out: Path) -> list[dict]:
    """The rows of a run's metrics.jsonl, one per optimizer step."""
    path = out / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _config_dict(cfg: TrainConfig) -> dict:
    return json.loads(json.dumps(asdict(cfg), default=str))


@torch.no_grad()
def eval_loss(model: torch.nn.Module, blocks: torch.Tensor, batch_size: int, max_batches: int) -> float:
    model.eval()
    losses = [model(input_ids=b, labels=b).loss.item() for b in blocks[: batch_size * max_batches].split(batch_size)]
    model.train()
    return float(np.mean(losses))


def train(cfg: TrainConfig, resume: bool = False) -> dict:
    """Run (or resume) a training job; returns a summary with final train and eval loss."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file
    from tqdm.auto import tqdm

    from hetune.data.text import BlockSampler, load_text_dataset, pack

    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    pm = build_private_model(
        cfg.model, cfg.backend, bundle=cfg.bundle, workers=cfg.workers, lora=cfg.lora, seed=cfg.seed, param_set=cfg.param_set
    )
    try:
        if cfg.save_key is not None:
            if not pm.backend.encrypted:
                raise ConfigError(f"--save-key needs an encrypted backend, not {cfg.backend!r}", "drop --save-key")
            pm.backend.keys.save(cfg.save_key)
        blocks = pack(load_text_dataset(cfg.data, cfg.text_field)["text"], pm.tokenizer, cfg.seq_len)
        n_eval = max(1, int(len(blocks) * cfg.eval_fraction))
        train_blocks, eval_blocks = blocks[:-n_eval], blocks[-n_eval:]
        params = [p for p in pm.model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(cfg.warmup_steps, cfg.steps, cfg.min_lr_ratio))
        start, data_state = 0, {"epoch": 0, "index": 0}
        cfg.out.mkdir(parents=True, exist_ok=True)
        metrics_path = cfg.out / "metrics.jsonl"
        ckpt = latest_checkpoint(cfg.out) if resume else None
        if resume and ckpt is None:
            raise ConfigError(f"no checkpoint to resume in {cfg.out}", "run without --resume to start fresh")
        if ckpt is not None:
            state = torch.load(ckpt / "trainer_state.pt", weights_only=False)
            set_peft_model_state_dict(pm.model, load_file(str(ckpt / "adapter" / "adapter_model.safetensors")))
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            _set_rng_state(state["rng"])
            start, data_state = state["step"], state["data"]
            kept = [row for row in read_metrics(cfg.out) if row["step"] <= start]
            metrics_path.write_text("".join(json.dumps(row) + "\n" for row in kept))
        elif metrics_path.exists():
            metrics_path.unlink()
        sampler = BlockSampler(train_blocks, cfg.batch_size, cfg.seed, **data_state)

        pm.model.train()
        last = {}
        bar = tqdm(range(start, cfg.steps), desc=f"train [{cfg.backend}]", unit="step", disable=not cfg.progress, mininterval=1.0,
                   initial=start, total=cfg.steps)
        for step in bar:
            t0, sent0, recv0 = time.perf_counter(), pm.backend.stats.bytes_sent, pm.backend.stats.bytes_received
            optimizer.zero_grad(set_to_none=True)
            loss_sum = 0.0
            try:
                for _ in range(cfg.grad_accum):
                    batch = sampler.next()
                    loss = pm.model(input_ids=batch, labels=batch).loss
                    (loss / cfg.grad_accum).backward()
                    loss_sum += loss.item() / cfg.grad_accum
            except WorkerError as err:
                where = latest_checkpoint(cfg.out)
                raise WorkerError(
                    f"{err.message} (at step {step + 1})",
                    f"last checkpoint: {where or 'none yet'}; restart the worker, then rerun with --resume",
                ) from err
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.clip_norm))
            optimizer.step()
            scheduler.step()
            done = step + 1
            last = {"step": done, "loss": loss_sum, "lr": scheduler.get_last_lr()[0], "grad_norm": grad_norm,
                    "step_time_s": time.perf_counter() - t0, "tokens": cfg.batch_size * cfg.grad_accum * cfg.seq_len,
                    "bytes_sent": pm.backend.stats.bytes_sent - sent0, "bytes_received": pm.backend.stats.bytes_received - recv0}
            if done % cfg.eval_every == 0 or done == cfg.steps:
                last["eval_loss"] = eval_loss(pm.model, eval_blocks, cfg.batch_size, cfg.eval_batches)
            with open(metrics_path, "a") as fh:
                fh.write(json.dumps(last) + "\n")
            bar.set_postfix(loss=f"{loss_sum:.3f}", s_step=f"{last['step_time_s']:.2f}",
                            sent_MB=f"{pm.backend.stats.bytes_sent / 1e6:.1f}", recv_MB=f"{pm.backend.stats.bytes_received / 1e6:.1f}")
            if done % cfg.save_every == 0 or done == cfg.steps:
                save_checkpoint(cfg.out, done, pm, optimizer, scheduler, sampler, cfg)
        adapter_dir = cfg.out / "adapter"
        tmp = cfg.out / ".adapter.partial"
        shutil.rmtree(tmp, ignore_errors=True)
        pm.model.save_pretrained(tmp)
        shutil.rmtree(adapter_dir, ignore_errors=True)
        tmp.rename(adapter_dir)
        return {"final_loss": last.get("loss"), "final_eval_loss": last.get("eval_loss"), "steps": cfg.steps,
                "adapter": str(adapter_dir), "metrics": str(metrics_path), "backend_stats": pm.backend.stats.snapshot()}
    finally:
        pm.close()
