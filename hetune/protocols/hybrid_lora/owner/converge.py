"""``hetune converge``: does private training converge like plaintext?

The same LoRA fine-tuning (same seed, same data order) on each requested backend, then
loss curves (JSON + PNG), final train and eval loss, the relative gap to ``plain``, and
the task metric when the task has one (exact match on the built-in arithmetic and
knowledge tasks, measured with the trained adapter on the float base model, greedy
decoding). Built-in tasks: ``arithmetic`` (word problems), ``stdlib`` (real text: Python
standard library sources, files the compiler's calibration does not read) and
``knowledge`` (a fictional company's facts, :mod:`hetune.data.knowledge`). With
``ablation`` it also reruns the quantization study Concrete ML reports, on the bit-exact
``quantized`` backend: per-token inputs with per-channel weights versus static
per-tensor scales, and 8 versus fewer bits. With ``levers`` it measures what closes the
gap on real weights at the same weight bits: wider activations and gradients (the batched
RLWE budget), a Hadamard rotation of op inputs, per-token clipping.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from hetune.errors import ConfigError
from hetune.files import write_json
from hetune.protocols.hybrid_lora.owner.backends import check_backend_name
from hetune.quant.config import QuantConfig

ARITHMETIC, STDLIB, KNOWLEDGE = "arithmetic", "stdlib", "knowledge"  # the built-in tasks
TASKS = (ARITHMETIC, STDLIB, KNOWLEDGE)
STDLIB_FILES = slice(20, 120)  # ~1.5 MB of sources; calibration reads the first files' start only


@dataclass(frozen=True)
class ConvergeConfig:
    model: str
    out: Path
    data: tuple[str, ...] = (ARITHMETIC,)
    steps: int = 200
    backends: tuple[str, ...] = ("plain", "quantized")
    quant: QuantConfig = QuantConfig()
    ablation: bool = False
    levers: bool = False
    seq_len: int = 64
    batch_size: int = 8
    lr: float = 3e-3
    warmup_steps: int = 20
    eval_every: int = 50
    train_problems: int = 4000  # arithmetic task sizes
    eval_problems: int = 100
    seed: int = 0
    progress: bool = True

    def __post_init__(self) -> None:
        if not self.backends or self.backends[0] != "plain":
            raise ConfigError(f"backends={','.join(self.backends)} must start with plain", "the gap is measured against plain")
        for b in self.backends:
            check_backend_name(b)
        if len(self.data) > 1 and set(self.data) & set(TASKS):
            raise ConfigError(f"data={','.join(self.data)} mixes a built-in task with files", "pass one built-in task or files only")
        if "remote" in self.backends:
            raise ConfigError("converge runs backends in this process; 'remote' is not one of them",
                              "use encrypted (same GLWE arithmetic, no network), or hetune train --backend remote")


@dataclass(frozen=True)
class Variant:
    name: str
    backend: str
    quant: QuantConfig | None  # None for plain


def quant_label(q: QuantConfig) -> str:
    """w8a8g8, then the levers in use: 'w8a12g12 hadamard clip0.9'."""
    parts = [f"w{q.bits_w}a{q.bits_a}g{q.bits_g}"]
    parts += ["hadamard"] if q.rotation == "hadamard" else []
    parts += [f"clip{q.clip_a:g}"] if q.clip_a < 1 else []
    return " ".join(parts)


def lever_configs(q: QuantConfig) -> list[QuantConfig]:
    """At the weight bits of ``q``: 8-bit inputs without levers, each lever alone, then together."""
    base = replace(q, bits_a=8, bits_g=8, rotation="none", clip_a=1.0)
    wide = replace(base, bits_a=12, bits_g=12)  # 4 more bits each fit the 29-bit RLWE budget at 8-bit weights
    return [base, replace(base, clip_a=0.9), replace(base, rotation="hadamard"), wide, replace(wide, rotation="hadamard")]


def variants(cfg: ConvergeConfig) -> list[Variant]:
    q = cfg.quant
    found = [Variant(b if b == "plain" else f"{b} {quant_label(q)}", b, None if b == "plain" else q) for b in cfg.backends]
    if cfg.ablation:  # Concrete ML's study, which has no rotation
        found += [
            Variant("quantized static per-tensor w8a8g8", "quantized", QuantConfig(8, 8, 8, ranges="static", rotation="none")),
            Variant("quantized w6a6g6", "quantized", QuantConfig(6, 6, 6, rotation="none")),
            Variant("quantized w4a4g4", "quantized", QuantConfig(4, 4, 4, rotation="none")),
        ]
    if cfg.levers:
        found += [Variant(f"quantized {quant_label(lq)}", "quantized", lq) for lq in lever_configs(q)]
    unique = {}
    for v in found:
        unique.setdefault((v.backend, v.quant), v)
    return list(unique.values())


def _bundle_for(cfg: ConvergeConfig, quant: QuantConfig, cache: dict) -> Path:
    from hetune.compile.compiler import CompileConfig, compile_bundle

    if quant not in cache:
        out = cfg.out / "bundles" / f"{quant.ranges}-{quant_label(quant).replace(' ', '-')}"
        compile_bundle(cfg.model, out, CompileConfig(quant=quant, seed=cfg.seed), overwrite=True, progress=False)
        cache[quant] = out
    return cache[quant]


def _task_data(cfg: ConvergeConfig):
    """Training files, and the held-out problems for the metric (None for text without one)."""
    from hetune.data.arithmetic import make_problems, write_jsonl

    path = cfg.out / "data" / f"{cfg.data[0]}_train.jsonl"
    if cfg.data == (ARITHMETIC,):
        write_jsonl(make_problems(cfg.train_problems, seed=cfg.seed), path)
        return (str(path),), make_problems(cfg.eval_problems, seed=cfg.seed + 1_000_003)
    if cfg.data == (KNOWLEDGE,):
        from hetune.data.knowledge import make_knowledge_task

        task = make_knowledge_task(seed=cfg.seed, repeats=16)  # ~5k tokens: eval blocks to spare at seq_len 128
        write_jsonl(task.train, path)
        return (str(path),), task.held_out
    if cfg.data == (STDLIB,):
        from hetune.data.corpus import stdlib_files
        from hetune.files import write_atomic

        docs = [f.read_text(encoding="utf-8", errors="replace") for f in stdlib_files()[STDLIB_FILES]]
        write_atomic(path, "".join(json.dumps({"text": d}) + "\n" for d in docs))  # one document per file
        return (str(path),), None
    return cfg.data, None


def _exact_match(cfg: ConvergeConfig, adapter: str, problems) -> float:
    from peft import PeftModel

    from hetune.data.arithmetic import exact_match
    from hetune.models.loading import load_model

    base = load_model(cfg.model, seed=cfg.seed)
    tokens = max(4, *(len(base.tokenizer(f" {p.answer}", add_special_tokens=False)["input_ids"]) for p in problems))
    return exact_match(PeftModel.from_pretrained(base.model, adapter), base.tokenizer, problems, max_new_tokens=tokens)


def converge(cfg: ConvergeConfig, echo=print) -> dict:
    from hetune.protocols.hybrid_lora.owner.plots import plot_losses
    from hetune.protocols.hybrid_lora.owner.train import TrainConfig, read_metrics, train

    cfg.out.mkdir(parents=True, exist_ok=True)
    data, problems = _task_data(cfg)
    cache, results, curves = {}, [], {}
    for v in variants(cfg):
        bundle = None if v.quant is None else _bundle_for(cfg, v.quant, cache)
        run_dir = cfg.out / "runs" / v.name.replace(" ", "_")
        echo(f"training: {v.name}")
        summary = train(TrainConfig(
            model=cfg.model, data=data, out=run_dir, backend=v.backend, bundle=bundle, seq_len=cfg.seq_len,
            batch_size=cfg.batch_size, steps=cfg.steps, lr=cfg.lr, warmup_steps=cfg.warmup_steps,
            eval_every=cfg.eval_every, save_every=cfg.steps, seed=cfg.seed, progress=cfg.progress, overwrite=True,
        ))
        rows = read_metrics(run_dir)
        tail = rows[-min(10, len(rows)):]
        result = {"name": v.name, "backend": v.backend, "quant": None if v.quant is None else asdict(v.quant),
                  "final_train_loss": sum(r["loss"] for r in tail) / len(tail), "final_eval_loss": summary["final_eval_loss"],
                  "eval_curve": [{"step": r["step"], "eval_loss": r["eval_loss"]} for r in rows if "eval_loss" in r]}
        if problems is not None:
            result["exact_match"] = _exact_match(cfg, summary["adapter"], problems)
        results.append(result)
        curves[v.name] = rows
    plain = results[0]
    for r in results:
        r["eval_gap_vs_plain"] = (r["final_eval_loss"] - plain["final_eval_loss"]) / plain["final_eval_loss"]
    report = {"config": json.loads(json.dumps(asdict(cfg), default=str)), "results": results,
              "curves": {k: [{"step": r["step"], "loss": r["loss"]} for r in v] for k, v in curves.items()}}
    write_json(cfg.out / "converge.json", report)
    plot_losses(curves, cfg.out / "converge.png", "convergence: private backends vs plaintext", log_scale=True)
    metric = "exact match" if problems is not None else ""
    echo(f"\n{'run':<40} {'train loss':>10} {'eval loss':>10} {'gap':>8} {metric:>12}")
    for r in results:
        em = f"{r['exact_match']:>12.1%}" if "exact_match" in r else ""
        echo(f"{r['name']:<40} {r['final_train_loss']:>10.4f} {r['final_eval_loss']:>10.4f} {r['eval_gap_vs_plain']:>+8.2%} {em}")
    echo(f"results: {cfg.out / 'converge.json'}  plot: {cfg.out / 'converge.png'}")
    return report
