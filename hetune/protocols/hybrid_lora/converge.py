"""``hetune converge``: does private training converge like plaintext?

The same LoRA fine-tuning (same seed, same data order) on each requested backend, then
loss curves (JSON + PNG), final train and eval loss, the relative gap to ``plain``, and
the task metric when the task has one (exact match on the built-in arithmetic task,
measured with the trained adapter on the float base model, greedy decoding). With
``ablation`` it also reruns the quantization study Concrete ML reports, on the bit-exact
``quantized`` backend: per-token inputs with per-channel weights versus static
per-tensor scales, and 8 versus fewer bits.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from hetune.errors import ConfigError
from hetune.files import write_json
from hetune.protocols.hybrid_lora.backends import check_backend_name
from hetune.quant.config import QuantConfig

ARITHMETIC = "arithmetic"  # the built-in task


@dataclass(frozen=True)
class ConvergeConfig:
    model: str
    out: Path
    data: tuple[str, ...] = (ARITHMETIC,)
    steps: int = 200
    backends: tuple[str, ...] = ("plain", "quantized")
    quant: QuantConfig = QuantConfig()
    ablation: bool = False
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
        if "remote" in self.backends:
            raise ConfigError("converge runs backends in this process; 'remote' is not one of them",
                              "use encrypted (same GLWE arithmetic, no network), or hetune train --backend remote")


@dataclass(frozen=True)
class Variant:
    name: str
    backend: str
    quant: QuantConfig | None  # None for plain


def variants(cfg: ConvergeConfig) -> list[Variant]:
    q = cfg.quant
    found = [Variant(b if b == "plain" else f"{b} w{q.bits_w}a{q.bits_a}g{q.bits_g}", b, None if b == "plain" else q) for b in cfg.backends]
    if cfg.ablation:
        found += [
            Variant("quantized static per-tensor w8a8g8", "quantized", QuantConfig(8, 8, 8, scheme="static")),
            Variant("quantized w6a6g6", "quantized", QuantConfig(6, 6, 6)),
            Variant("quantized w4a4g4", "quantized", QuantConfig(4, 4, 4)),
        ]
    unique = {}
    for v in found:
        unique.setdefault((v.backend, v.quant), v)
    return list(unique.values())


def _bundle_for(cfg: ConvergeConfig, quant: QuantConfig, cache: dict) -> Path:
    from hetune.compile.bundle import write_bundle
    from hetune.compile.compiler import CompileConfig, compile_model
    from hetune.models.loading import load_model

    if quant not in cache:
        out = cfg.out / "bundles" / f"{quant.scheme}-w{quant.bits_w}a{quant.bits_a}g{quant.bits_g}"
        out.parent.mkdir(parents=True, exist_ok=True)
        compiled = compile_model(load_model(cfg.model, seed=cfg.seed), CompileConfig(quant=quant, seed=cfg.seed), progress=False)
        write_bundle(out, compiled.manifest, compiled.tensors, compiled.report, overwrite=True)
        cache[quant] = out
    return cache[quant]


def _task_data(cfg: ConvergeConfig):
    """Training files, and the held-out problems for the metric (None for user data)."""
    if cfg.data != (ARITHMETIC,):
        return cfg.data, None
    from hetune.data.arithmetic import make_problems, write_jsonl

    path = cfg.out / "data" / "arithmetic_train.jsonl"
    write_jsonl(make_problems(cfg.train_problems, seed=cfg.seed), path)
    return (str(path),), make_problems(cfg.eval_problems, seed=cfg.seed + 1_000_003)


def _exact_match(cfg: ConvergeConfig, adapter: str, problems) -> float:
    from peft import PeftModel

    from hetune.data.arithmetic import exact_match
    from hetune.models.loading import load_model

    base = load_model(cfg.model, seed=cfg.seed)
    return exact_match(PeftModel.from_pretrained(base.model, adapter), base.tokenizer, problems)


def converge(cfg: ConvergeConfig, echo=print) -> dict:
    from hetune.protocols.hybrid_lora.plots import plot_losses
    from hetune.protocols.hybrid_lora.train import TrainConfig, read_metrics, train

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
            eval_every=cfg.eval_every, save_every=cfg.steps, seed=cfg.seed, progress=cfg.progress,
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
