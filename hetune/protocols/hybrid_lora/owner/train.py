"""``hetune train``: the data owner's private LoRA loop, one readable function.

The same loop runs on every backend; only ``build_private_model`` differs. Checkpoints
hold the adapter (peft ``save_pretrained``), optimizer, scheduler, RNG states and the
data position, written atomically, so ``--resume`` continues exactly and a worker that
goes away mid-step, a kill, or a full disk leaves the last checkpoint intact. Training
data is read and checked before a model is built or ``out`` is created. A run directory
holds one run: a new run into it is refused without ``overwrite``, a resume must keep the
settings that define the run (``RESUME_MUST_MATCH``, the bundle's weights, the scheme), and
SIGINT/SIGTERM end it after the current step with a checkpoint.
"""

from __future__ import annotations

import io
import json
import pickle
import random
import re
import shutil
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from hetune.errors import ConfigError, HetuneError, OutputError, WorkerError
from hetune.files import write_atomic, write_dir_atomic
from hetune.models.families import family_of
from hetune.protocols.hybrid_lora.owner.adapter import save_adapter
from hetune.protocols.hybrid_lora.owner.client import LoraSettings, PrivateModel, build_private_model
from hetune.schedule import warmup_cosine


REPORT_TO = ("tensorboard",)
RUN_FILES = ("metrics.jsonl", "checkpoints", "adapter", "tensorboard")  # what a run writes under ``out``
RESUME_MUST_MATCH = ("model", "data", "text_field", "seq_len", "batch_size", "grad_accum", "seed", "lora")


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
    save_total_limit: int | None = None  # keep only the newest N checkpoints (None: all), like Hugging Face's
    overwrite: bool = False  # replace a run already in ``out`` (its metrics, checkpoints, adapter)
    report_to: tuple[str, ...] = ()  # also log metrics to: "tensorboard" (event files under out/tensorboard)
    stop_after: int | None = None  # end this run after this step (checkpointed); --resume continues it, on any backend
    lora: LoraSettings = field(default_factory=LoraSettings)
    seed: int = 0
    save_key: Path | None = None  # write the secret key here (0600); never written otherwise
    load_key: Path | None = None  # use this saved secret key (e.g. to resume with the same key)
    scheme: str | None = None  # encryption scheme (None: the bundle's, batched RLWE by default)
    param_set: str | None = None  # its allow-listed parameter set (privacy level); None: the bundle's
    hint_cache: Path | None = None  # batched RLWE with fixed masks: the worker's hints kept here; None: fresh masks per request
    overlap: bool = False  # batched RLWE: each product pipelined (encrypt, upload, the worker's GEMM, decrypt at once); same results
    checkpoint: bool = False  # activation checkpointing of the decoder layers, the worker's answers replayed: less memory, same results
    ca_cert: Path | None = None  # remote: the CA that signed the workers' certificates; None: the system's store
    insecure: bool = False  # remote: allow plain http:// to a worker that is not on loopback
    api_key_file: Path | None = None  # remote: the admission key (else $HETUNE_API_KEY); the key itself is never in the config
    progress: bool = True

    def __post_init__(self) -> None:
        for name in ("seq_len", "batch_size", "grad_accum", "steps", "eval_every", "save_every", "eval_batches"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)} must be >= 1", f"pass a positive --{name.replace('_', '-')}")
        if self.save_total_limit is not None and self.save_total_limit < 1:
            raise ConfigError(f"save_total_limit={self.save_total_limit} must be >= 1", "keep at least the last checkpoint, or leave it out")
        unknown = set(self.report_to) - set(REPORT_TO)
        if unknown:
            raise ConfigError(f"--report-to {', '.join(sorted(unknown))} is unknown", f"choose among {', '.join(REPORT_TO)}")
        if self.stop_after is not None and self.stop_after < 1:
            raise ConfigError(f"stop_after={self.stop_after} must be >= 1", "pass a positive --stop-after, or leave it out")
        if not 0 < self.eval_fraction < 1:
            raise ConfigError(f"eval_fraction={self.eval_fraction} must be in (0, 1)", "use e.g. 0.1")
        if self.lr <= 0:
            raise ConfigError(f"lr={self.lr} must be > 0", "use e.g. 1e-3 for LoRA")
        crypto = {"--scheme": self.scheme, "--param-set": self.param_set, "--save-key": self.save_key, "--load-key": self.load_key,
                  "--hint-cache": self.hint_cache}
        given = [flag for flag, value in crypto.items() if value is not None]
        if given and self.backend not in ("encrypted", "remote"):
            raise ConfigError(f"{', '.join(given)} apply to the encrypted and remote backends, not {self.backend!r}",
                              f"drop {', '.join(given)} or use --backend remote")
        if self.overlap and self.backend not in ("encrypted", "remote"):
            raise ConfigError(f"--overlap pipelines encrypted products, and backend {self.backend!r} has none",
                              "drop --overlap or use --backend remote")
        if self.scheme is not None or self.param_set is not None:
            from hetune.crypto.registry import get_scheme

            scheme = get_scheme(self.scheme)  # ConfigError naming the choices
            if self.param_set is not None and self.param_set not in scheme.param_sets:
                raise scheme.unknown_set(self.param_set)
        if self.hint_cache is not None and (self.save_key or self.load_key):
            raise ConfigError("--hint-cache draws a fresh secret for every product: there is no session key to save or load",
                              "drop --save-key/--load-key, or drop --hint-cache")
        if self.load_key is not None and not Path(self.load_key).is_file():
            raise ConfigError(f"--load-key {self.load_key} does not exist", "pass the file written by --save-key")
        if self.backend == "remote":
            from hetune.protocols.hybrid_lora.owner.remote import WorkerAccess

            for url in self.workers:
                WorkerAccess(insecure=self.insecure).check_url(url)
        for flag, path in (("--ca-cert", self.ca_cert), ("--api-key-file", self.api_key_file)):
            if path is not None and not Path(path).is_file():
                raise ConfigError(f"{flag} {path} does not exist", f"pass an existing file to {flag}")

    def warnings(self) -> list[str]:
        """Settings that run but are probably not what the user meant."""
        found = []
        if self.warmup_steps >= self.steps:
            found.append(f"--warmup-steps {self.warmup_steps} >= --steps {self.steps}: the learning rate never reaches "
                         f"--lr {self.lr:g} (it stops at {self.steps / self.warmup_steps:.0%} of it)")
        return found


def _rng_state() -> dict:
    """Only types ``torch.load(weights_only=True)`` accepts: numpy's key array as a tensor."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached]}


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))


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


_STEP_DIR = re.compile(r"step-(\d+)")


def save_checkpoint(out: Path, step: int, pm: PrivateModel, optimizer, scheduler, position: dict, rng: dict,
                    cfg: TrainConfig, run: dict, keep: int | None = None) -> Path:
    """out/checkpoints/step-N, written to a temp dir then renamed; out/checkpoints/latest then names it.

    ``position`` and ``rng``: the data position and RNG states after step N. ``run``: what a resume
    must match beyond the config (the bundle's weights, the effective scheme). A failed write raises
    OutputError and leaves ``latest`` on the previous, whole checkpoint. ``keep``: then delete all
    but the newest ``keep`` checkpoints.
    """
    root = out / "checkpoints"
    final = root / f"step-{step}"
    state = io.BytesIO()  # serialised first: a full disk then fails in write_bytes with an OSError, not in torch
    torch.save({"step": step, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "rng": rng, "data": position, "config": _config_dict(cfg), "run": run}, state)

    def write(tmp: Path) -> None:
        pm.model.save_pretrained(tmp / "adapter", save_embedding_layers=False)  # "auto" asks the hub about the vocabulary
        (tmp / "trainer_state.pt").write_bytes(state.getvalue())

    with _output_errors(final, out):
        write_dir_atomic(final, write)
        write_atomic(root / "latest", final.name)
        if keep is not None:
            for old in checkpoints(out)[:-keep]:
                shutil.rmtree(old)
    return final


def checkpoints(out: Path) -> list[Path]:
    """The run's step-N checkpoint directories, oldest first."""
    root = out / "checkpoints"
    found = [p for p in root.iterdir() if p.is_dir() and _STEP_DIR.fullmatch(p.name)] if root.is_dir() else []
    return sorted(found, key=lambda p: int(p.name[5:]))


def latest_checkpoint(out: Path) -> Path | None:
    """The checkpoint ``out/checkpoints/latest`` names: only a step-N directory beside it, never a path elsewhere."""
    pointer = out / "checkpoints" / "latest"
    if not pointer.is_file():
        return None
    name = pointer.read_text().strip()
    if not _STEP_DIR.fullmatch(name) or not (pointer.parent / name).is_dir():
        raise OutputError(f"{pointer} names {name[:80]!r}, not a step-N checkpoint directory beside it",
                          f"write the name of one of the step-N directories in {pointer.parent} into it, or start fresh with --overwrite")
    return pointer.parent / name


def read_trainer_state(ckpt: Path) -> dict:
    """A checkpoint's trainer state, loaded with ``weights_only=True``: tensors and plain values, no code."""
    try:
        return torch.load(ckpt / "trainer_state.pt", weights_only=True)
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as err:  # torch reports a damaged file as RuntimeError
        raise OutputError(f"checkpoint {ckpt} cannot be read: {err}",
                          f"point {ckpt.parent / 'latest'} at an earlier step-N, or start fresh with --overwrite") from err


def load_checkpoint(ckpt: Path, state: dict, pm: PrivateModel, optimizer, scheduler) -> None:
    """Restore adapter, optimizer, scheduler and RNG states from ``state`` (:func:`read_trainer_state`)."""
    from peft import set_peft_model_state_dict
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        weights = load_file(str(ckpt / "adapter" / "adapter_model.safetensors"))
    except (OSError, SafetensorError) as err:
        raise OutputError(f"checkpoint {ckpt} cannot be read: {err}",
                          f"point {ckpt.parent / 'latest'} at an earlier step-N, or start fresh with --overwrite") from err
    set_peft_model_state_dict(pm.model, weights)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    _set_rng_state(state["rng"])


def check_resume(cfg: TrainConfig, state: dict, ckpt: Path) -> None:
    """Refuse to continue a run under settings that would make it another run (RESUME_MUST_MATCH), or past its end."""
    saved, now = state.get("config", {}), _config_dict(cfg)
    for name in RESUME_MUST_MATCH:
        if name in saved and saved[name] != now[name]:
            flag = "--" + name.replace("_", "-")
            raise ConfigError(f"the run in {cfg.out} was trained with {name}={saved[name]}, not {now[name]}",
                              f"resume it with the same {flag} (or start another run in a new --out)")
    step = state["step"]
    if cfg.steps <= step:
        raise ConfigError(f"the run in {cfg.out} is at step {step} ({ckpt.name}); --steps {cfg.steps} is the total, so "
                          "there is nothing left to train", f"pass --steps above {step} to continue it")
    if cfg.stop_after is not None and cfg.stop_after <= step:
        raise ConfigError(f"the run in {cfg.out} is already at step {step}; --stop-after {cfg.stop_after} is a step, not a count",
                          f"pass --stop-after above {step}, or leave it out to train to --steps {cfg.steps}")


def check_resume_run(cfg: TrainConfig, saved: dict, now: dict) -> None:
    """What only the built model knows: the bundle's weights and the encryption scheme in use."""
    for name, what in (("bundle_weights_sha256", "a bundle with other weights"), ("scheme", "another encryption scheme")):
        if saved.get(name) and now.get(name) and saved[name] != now[name]:
            raise ConfigError(f"the run in {cfg.out} was trained with {what} ({name} {saved[name]}, now {now[name]})",
                              "resume it with the bundle (worker) and --scheme/--param-set it started with")


def _run_facts(pm: PrivateModel) -> dict:
    facts = {}
    if pm.manifest is not None:
        from hetune.compile.bundle import WEIGHTS_FILE

        facts["bundle_weights_sha256"] = pm.manifest.files.get(WEIGHTS_FILE, {}).get("sha256", "")
    if pm.backend.encrypted:
        facts["scheme"] = f"{pm.backend.keys.params.scheme}/{pm.backend.keys.params.name}"
    return facts


def prepare_out(cfg: TrainConfig, resume: bool) -> None:
    """Refuse to mix a new run into an existing one; with ``overwrite``, clear the old run's files first."""
    found = [name for name in RUN_FILES if (cfg.out / name).exists()]
    if resume or not found:
        return
    if not cfg.overwrite:
        raise ConfigError(f"{cfg.out} already holds a run ({', '.join(found)})",
                          "pass --resume to continue it, --overwrite to replace it, or choose another --out")
    with _output_errors(cfg.out, cfg.out):
        for name in found:
            path = cfg.out / name
            shutil.rmtree(path) if path.is_dir() else path.unlink()


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
def eval_loss(model: torch.nn.Module, blocks: torch.Tensor, batch_size: int, max_batches: int, progress: bool = False) -> float:
    from tqdm.auto import tqdm

    model.eval()
    batches = blocks[: batch_size * max_batches].split(batch_size)
    losses = [model(input_ids=b, labels=b).loss.item()
              for b in tqdm(batches, desc="eval", unit="batch", disable=not progress, leave=False)]
    model.train()
    return float(np.mean(losses))


class TrainingInterrupted(HetuneError):
    """SIGINT or SIGTERM stopped the run after a checkpoint; the exit code is 128 + the signal's number."""

    def __init__(self, message: str, hint: str, signum: int):
        super().__init__(message, hint)
        self.exit_code = 128 + signum


class _Abandon(BaseException):
    """A second signal during a step: abandon it (BaseException, so no ``except Exception`` swallows it)."""


class _Signals:
    """The first SIGINT/SIGTERM asks the loop to stop after the current step; a second abandons the step.

    A step through an encrypted worker takes minutes; losing it is the user's explicit choice.
    """

    def __init__(self, echo) -> None:
        self.signum: int | None = None
        self.in_step = False
        self._echo, self._saved = echo, {}

    def _handle(self, signum, _frame) -> None:
        if self.signum is not None and self.in_step:
            raise _Abandon
        self.signum = signum
        self._echo("stopping after this step and saving a checkpoint (press Ctrl-C again to abandon the step)")

    def __enter__(self) -> "_Signals":
        if threading.current_thread() is threading.main_thread():  # signal handlers can only be set there
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._saved[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._saved.items():
            signal.signal(sig, handler)


def _stderr(message: str) -> None:
    import sys

    print(message, file=sys.stderr, flush=True)


def _open_run(cfg: TrainConfig, resume: bool):
    """The texts, and the checkpoint to resume with its saved state (None, None on a fresh run), all checked
    before any model, worker session, key or output exists."""
    from hetune.data.text import load_texts

    if resume and cfg.overwrite:
        raise ConfigError("--resume and --overwrite contradict each other", "pass --resume to continue the run, or --overwrite to replace it")
    texts = load_texts(cfg.data, cfg.text_field)  # bad data fails here: no model, worker session, key or output yet
    ckpt = latest_checkpoint(cfg.out) if resume else None
    if resume and ckpt is None:
        raise ConfigError(f"no checkpoint to resume in {cfg.out}", "run without --resume to start fresh")
    prepare_out(cfg, resume)
    saved = read_trainer_state(ckpt) if ckpt is not None else None
    if saved is not None:
        check_resume(cfg, saved, ckpt)
    return texts, ckpt, saved


def _private_model(cfg: TrainConfig):
    """Seeded, with the keys to load (if any) and the access to its workers (remote)."""
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
    return build_private_model(
        cfg.model, cfg.backend, bundle=cfg.bundle, workers=cfg.workers, lora=cfg.lora, seed=cfg.seed,
        keys=keys, scheme=cfg.scheme, param_set=cfg.param_set, access=access, hint_cache=cfg.hint_cache, overlap=cfg.overlap, checkpoint=cfg.checkpoint,
    )


def _accumulate(cfg: TrainConfig, pm, sampler, step: int, signals: _Signals) -> float:
    """Forward and backward of one optimizer step's batches; the mean loss. A worker failure names the step and how to resume."""
    loss_sum = 0.0
    try:
        signals.in_step = True
        for _ in range(cfg.grad_accum):
            batch = sampler.next()
            loss = pm.loss(batch)
            (loss / cfg.grad_accum).backward()
            loss_sum += loss.item() / cfg.grad_accum
        signals.in_step = False
    except WorkerError as err:
        where = latest_checkpoint(cfg.out)
        then = f"rerun with --resume (from {where})" if where else "rerun with --overwrite (no checkpoint yet)"
        raise WorkerError(f"{err.message} (at step {step + 1})", f"{err.hint + '; ' if err.hint else ''}then {then}") from err
    return loss_sum


def _record(cfg: TrainConfig, row: dict, metrics_path: Path, writer) -> None:
    with _output_errors(metrics_path, cfg.out), open(metrics_path, "a") as fh:
        fh.write(json.dumps(row) + "\n")
    if writer is not None:
        _log_tensorboard(writer, row)


def train(cfg: TrainConfig, resume: bool = False, echo=_stderr) -> dict:
    """Run (or resume) a training job; returns a summary with final train and eval loss.

    ``cfg.steps`` is the run's total: a resumed run continues to it. SIGINT/SIGTERM end the run
    after the current step with a checkpoint and :class:`TrainingInterrupted`.
    """
    from tqdm.auto import tqdm

    from hetune.data.text import BlockSampler, pack

    texts, ckpt, saved = _open_run(cfg, resume)
    pm = _private_model(cfg)
    writer = None
    try:
        run = _run_facts(pm)
        if saved is not None:
            check_resume_run(cfg, saved.get("run", {}), run)
        bos = pm.tokenizer.bos_token_id if family_of(pm.model.config).bos_per_block else None
        blocks = pack(texts, pm.tokenizer, cfg.seq_len, bos)
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
            if saved is not None:
                load_checkpoint(ckpt, saved, pm, optimizer, scheduler)
                start, data_state = saved["step"], saved["data"]
                kept = [row for row in read_metrics(cfg.out) if row["step"] <= start]
                write_atomic(metrics_path, "".join(json.dumps(row) + "\n" for row in kept))
        sampler = BlockSampler(train_blocks, cfg.batch_size, cfg.seed, **data_state)
        if "tensorboard" in cfg.report_to:
            writer = _tensorboard(cfg.out / "tensorboard", start)

        pm.model.train()
        last = {}
        end = min(cfg.steps, cfg.stop_after or cfg.steps)
        bar = tqdm(range(start, end), desc=f"train [{cfg.backend}]", unit="step", disable=not cfg.progress, mininterval=1.0,
                   initial=start, total=cfg.steps)
        done, position, rng = start, sampler.state(), _rng_state()  # the state after step `done`
        with _Signals(echo) as signals:
            for step in bar:
                t0, sent0, recv0 = time.perf_counter(), pm.backend.stats.bytes_sent, pm.backend.stats.bytes_received
                optimizer.zero_grad(set_to_none=True)
                try:
                    loss_sum = _accumulate(cfg, pm, sampler, step, signals)
                except _Abandon:
                    bar.close()
                    _interrupted(cfg, signals.signum, done, pm, optimizer, scheduler, position, rng, run, abandoned=step + 1)
                grad_norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.clip_norm))
                optimizer.step()
                scheduler.step()
                done, position, rng = step + 1, sampler.state(), _rng_state()
                last = {"step": done, "loss": loss_sum, "lr": scheduler.get_last_lr()[0], "grad_norm": grad_norm,
                        "step_time_s": time.perf_counter() - t0, "tokens": cfg.batch_size * cfg.grad_accum * cfg.seq_len,
                        "bytes_sent": pm.backend.stats.bytes_sent - sent0, "bytes_received": pm.backend.stats.bytes_received - recv0}
                if (done % cfg.eval_every == 0 or done == cfg.steps) and signals.signum is None:
                    last["eval_loss"] = eval_loss(pm.model, eval_blocks, cfg.batch_size, cfg.eval_batches, cfg.progress)
                _record(cfg, last, metrics_path, writer)
                bar.set_postfix(loss=f"{loss_sum:.3f}", s_step=f"{last['step_time_s']:.2f}",
                                sent_MB=f"{pm.backend.stats.bytes_sent / 1e6:.1f}", recv_MB=f"{pm.backend.stats.bytes_received / 1e6:.1f}")
                if signals.signum is not None:
                    bar.close()
                    _interrupted(cfg, signals.signum, done, pm, optimizer, scheduler, position, rng, run)
                if done % cfg.save_every == 0 or done == end:
                    save_checkpoint(cfg.out, done, pm, optimizer, scheduler, position, rng, cfg, run, cfg.save_total_limit)
        adapter_dir = cfg.out / "adapter"
        with _output_errors(adapter_dir, cfg.out):
            write_dir_atomic(adapter_dir, lambda tmp: save_adapter(pm, cfg.model, cfg.seed, tmp))
        return {"final_loss": last.get("loss"), "final_eval_loss": last.get("eval_loss"), "steps": cfg.steps,
                "adapter": str(adapter_dir), "metrics": str(metrics_path), "backend_stats": pm.backend.stats.snapshot()}
    finally:
        if writer is not None:
            writer.close()
        pm.close()


def _interrupted(cfg: TrainConfig, signum: int, done: int, pm, optimizer, scheduler, position, rng, run,
                 abandoned: int | None = None) -> None:
    """Checkpoint step ``done`` (unless that checkpoint exists) and raise TrainingInterrupted saying how to resume."""
    ckpt = cfg.out / "checkpoints" / f"step-{done}"
    if done > 0 and not ckpt.is_dir():
        save_checkpoint(cfg.out, done, pm, optimizer, scheduler, position, rng, cfg, run, cfg.save_total_limit)
    what = f"step {abandoned} abandoned; " if abandoned else ""
    name = signal.Signals(signum).name
    if done == 0:
        raise TrainingInterrupted(f"{name}: stopped before the first step finished; nothing to resume",
                                  "rerun the same command (with --overwrite if --out now holds files)", signum)
    raise TrainingInterrupted(f"{name}: {what}stopped after step {done} of {cfg.steps}; checkpoint {ckpt}",
                              "continue with the same command plus --resume", signum)


def _tensorboard(logdir: Path, start: int):
    """tensorboardX writes the same event files as torch.utils.tensorboard without the tensorboard server's dependencies."""
    from tensorboardX import SummaryWriter

    return SummaryWriter(str(logdir), purge_step=start + 1 if start else None)  # a resume drops events past its checkpoint


def _log_tensorboard(writer, row: dict) -> None:
    for key, value in row.items():
        if key != "step" and isinstance(value, (int, float)):
            writer.add_scalar(f"{'eval' if key == 'eval_loss' else 'train'}/{key.removeprefix('eval_')}", value, row["step"])
    writer.flush()
