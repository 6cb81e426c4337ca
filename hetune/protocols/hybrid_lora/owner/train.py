"""``hetune train``: the data owner's private LoRA loop, one readable function.

The same loop runs on every backend; only ``build_private_model`` differs. Checkpoints
hold the adapter (peft ``save_pretrained``), optimizer, scheduler, RNG states and the
data position, written atomically, so ``--resume`` continues exactly and a worker that
goes away mid-step, a kill, or a full disk leaves the last checkpoint intact. Training
data is read and checked before a model is built or ``out`` is created.
"""

from __future__ import annotations

import io
import json
import random
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from hetune.errors import ConfigError, OutputError, WorkerError
from hetune.files import write_atomic, write_dir_atomic
from hetune.protocols.hybrid_lora.owner.client import LoraSettings, PrivateModel, build_private_model
from hetune.schedule import warmup_cosine


@dataclass(frozen=True)
class TrainConfig:
    model: str
    data: tuple[str, ...]
    out: Path
    backend: str = "remote"  # private fine-tuning against a worker; plain/quantized/encrypted for checks and long runs
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
    stop_after: int | None = None  # end this run after this step (checkpointed); --resume continues it, on any backend
    lora: LoraSettings = field(default_factory=LoraSettings)
    seed: int = 0
    save_key: Path | None = None  # write the secret key here (0600); never written otherwise
    load_key: Path | None = None  # use this saved secret key (e.g. to resume with the same key)
    scheme: str | None = None  # encryption scheme (None: the bundle's, batched RLWE by default)
    param_set: str | None = None  # its allow-listed parameter set (privacy level); None: the bundle's
    ca_cert: Path | None = None  # remote: the CA that signed the workers' certificates; None: the system's store
    insecure: bool = False  # remote: allow plain http:// to a worker that is not on loopback
    api_key_file: Path | None = None  # remote: the admission key (else $HETUNE_API_KEY); the key itself is never in the config
    progress: bool = True

    def __post_init__(self) -> None:
        for name in ("seq_len", "batch_size", "grad_accum", "steps", "eval_every", "save_every", "eval_batches"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)} must be >= 1", f"pass a positive --{name.replace('_', '-')}")
        if self.stop_after is not None and self.stop_after < 1:
            raise ConfigError(f"stop_after={self.stop_after} must be >= 1", "pass a positive --stop-after, or leave it out")
        if not 0 < self.eval_fraction < 1:
            raise ConfigError(f"eval_fraction={self.eval_fraction} must be in (0, 1)", "use e.g. 0.1")
        if self.lr <= 0:
            raise ConfigError(f"lr={self.lr} must be > 0", "use e.g. 1e-3 for LoRA")
        crypto = {"--scheme": self.scheme, "--param-set": self.param_set, "--save-key": self.save_key, "--load-key": self.load_key}
        given = [flag for flag, value in crypto.items() if value is not None]
        if given and self.backend not in ("encrypted", "remote"):
            raise ConfigError(f"{', '.join(given)} apply to the encrypted and remote backends, not {self.backend!r}",
                              f"drop {', '.join(given)} or use --backend remote")
        if self.scheme is not None or self.param_set is not None:
            from hetune.crypto.registry import get_scheme

            scheme = get_scheme(self.scheme)  # ConfigError naming the choices
            if self.param_set is not None and self.param_set not in scheme.param_sets:
                raise scheme.unknown_set(self.param_set)
        if self.load_key is not None and not Path(self.load_key).is_file():
            raise ConfigError(f"--load-key {self.load_key} does not exist", "pass the file written by --save-key")
        if self.backend == "remote":
            from hetune.protocols.hybrid_lora.owner.remote import WorkerAccess

            for url in self.workers:
                WorkerAccess(insecure=self.insecure).check_url(url)
        for flag, path in (("--ca-cert", self.ca_cert), ("--api-key-file", self.api_key_file)):
            if path is not None and not Path(path).is_file():
                raise ConfigError(f"{flag} {path} does not exist", f"pass an existing file to {flag}")


def _rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])


@contextmanager
def _output_errors(path: Path, out: Path) -> Iterator[None]:
    """Turn a failed write under ``out`` (full disk, no permission, a file in the way) into an OutputError
    naming ``path`` and the checkpoint to resume from. safetensors reports I/O failures as ``SafetensorError``."""
    from safetensors import SafetensorError

    try:
        yield
    except (OSError, SafetensorError) as err:
        where = latest_checkpoint(out)
        resume = f"; the last checkpoint ({where}) is intact: rerun with --resume" if where else ", then rerun"
        raise OutputError(f"could not write {path}: {getattr(err, 'strerror', None) or err}",
                          f"free disk space or fix permissions under {out}{resume}") from err


def save_checkpoint(out: Path, step: int, pm: PrivateModel, optimizer, scheduler, sampler, cfg: TrainConfig) -> Path:
    """out/checkpoints/step-N, written to a temp dir then renamed; out/checkpoints/latest then names it.

    A failed write raises OutputError and leaves ``latest`` on the previous, whole checkpoint.
    """
    root = out / "checkpoints"
    final = root / f"step-{step}"
    state = io.BytesIO()  # serialised first: a full disk then fails in write_bytes with an OSError, not in torch
    torch.save({"step": step, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "rng": _rng_state(), "data": sampler.state(), "config": _config_dict(cfg)}, state)

    def write(tmp: Path) -> None:
        pm.model.save_pretrained(tmp / "adapter")
        (tmp / "trainer_state.pt").write_bytes(state.getvalue())

    with _output_errors(final, out):
        write_dir_atomic(final, write)
        write_atomic(root / "latest", final.name)
    return final


def latest_checkpoint(out: Path) -> Path | None:
    pointer = out / "checkpoints" / "latest"
    return out / "checkpoints" / pointer.read_text().strip() if pointer.is_file() else None


def load_checkpoint(ckpt: Path, pm: PrivateModel, optimizer, scheduler) -> tuple[int, dict]:
    """Restore adapter, optimizer, scheduler and RNG states; returns (step, data position)."""
    from peft import set_peft_model_state_dict
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        state = torch.load(ckpt / "trainer_state.pt", weights_only=False)
        weights = load_file(str(ckpt / "adapter" / "adapter_model.safetensors"))
    except (OSError, RuntimeError, EOFError, SafetensorError) as err:  # torch reports a damaged file as RuntimeError
        raise OutputError(f"checkpoint {ckpt} cannot be read: {err}",
                          f"point {ckpt.parent / 'latest'} at an earlier step-N, or start fresh without --resume") from err
    set_peft_model_state_dict(pm.model, weights)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    _set_rng_state(state["rng"])
    return state["step"], state["data"]


def read_metrics(out: Path) -> list[dict]:
    """The rows of a run's metrics.jsonl, one per optimizer step; a last line cut short (kill, full disk) is left out."""
    path = out / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    rows = [json.loads(line) for line in lines[:-1]]
    try:
        rows += [json.loads(line) for line in lines[-1:]]
    except json.JSONDecodeError:
        pass
    return rows


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
    from tqdm.auto import tqdm

    from hetune.data.text import BlockSampler, load_texts, pack

    texts = load_texts(cfg.data, cfg.text_field)  # bad data fails here: no model, worker session, key or output yet
    ckpt = latest_checkpoint(cfg.out) if resume else None
    if resume and ckpt is None:
        raise ConfigError(f"no checkpoint to resume in {cfg.out}", "run without --resume to start fresh")
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    keys = None
    if cfg.load_key is not None:
        from hetune.crypto.keys import load_keys

        keys = load_keys(cfg.load_key, cfg.scheme)
    access = None
    if cfg.backend == "remote":
        from hetune.protocols.hybrid_lora.owner.remote import WorkerAccess

        access = WorkerAccess.load(cfg.ca_cert, cfg.insecure, cfg.api_key_file)
    pm = build_private_model(
        cfg.model, cfg.backend, bundle=cfg.bundle, workers=cfg.workers, lora=cfg.lora, seed=cfg.seed,
        keys=keys, scheme=cfg.scheme, param_set=cfg.param_set, access=access,
    )
    try:
        blocks = pack(texts, pm.tokenizer, cfg.seq_len)
        if cfg.save_key is not None:
            pm.backend.keys.save(cfg.save_key)
        n_eval = max(1, int(len(blocks) * cfg.eval_fraction))
        train_blocks, eval_blocks = blocks[:-n_eval], blocks[-n_eval:]
        params = [p for p in pm.model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(cfg.warmup_steps, cfg.steps, cfg.min_lr_ratio))
        start, data_state = 0, {"epoch": 0, "index": 0}
        metrics_path = cfg.out / "metrics.jsonl"
        with _output_errors(cfg.out, cfg.out):
            cfg.out.mkdir(parents=True, exist_ok=True)
            if ckpt is not None:
                start, data_state = load_checkpoint(ckpt, pm, optimizer, scheduler)
                kept = [row for row in read_metrics(cfg.out) if row["step"] <= start]
                write_atomic(metrics_path, "".join(json.dumps(row) + "\n" for row in kept))
            else:
                metrics_path.unlink(missing_ok=True)
        sampler = BlockSampler(train_blocks, cfg.batch_size, cfg.seed, **data_state)

        pm.model.train()
        last = {}
        end = min(cfg.steps, cfg.stop_after or cfg.steps)
        bar = tqdm(range(start, end), desc=f"train [{cfg.backend}]", unit="step", disable=not cfg.progress, mininterval=1.0,
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
            with _output_errors(metrics_path, cfg.out), open(metrics_path, "a") as fh:
                fh.write(json.dumps(last) + "\n")
            bar.set_postfix(loss=f"{loss_sum:.3f}", s_step=f"{last['step_time_s']:.2f}",
                            sent_MB=f"{pm.backend.stats.bytes_sent / 1e6:.1f}", recv_MB=f"{pm.backend.stats.bytes_received / 1e6:.1f}")
            if done % cfg.save_every == 0 or done == end:
                save_checkpoint(cfg.out, done, pm, optimizer, scheduler, sampler, cfg)
        adapter_dir = cfg.out / "adapter"
        with _output_errors(adapter_dir, cfg.out):
            write_dir_atomic(adapter_dir, pm.model.save_pretrained)
        return {"final_loss": last.get("loss"), "final_eval_loss": last.get("eval_loss"), "steps": cfg.steps,
                "adapter": str(adapter_dir), "metrics": str(metrics_path), "backend_stats": pm.backend.stats.snapshot()}
    finally:
        pm.close()
