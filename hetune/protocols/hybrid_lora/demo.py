"""``hetune demo``: the whole protocol offline, in one command, in a few minutes on 2 cores.

Builds the built-in micro Llama and training text (Python standard library sources),
compiles a bundle, starts a worker on loopback, runs a few private LoRA steps through
the ``remote`` backend with real GLWE encryption, runs the same steps from the same seed
in plaintext (and on the bit-exact ``quantized`` backend), then prints the losses side
by side and writes a plot and the adapter. The worker is stopped on exit, Ctrl-C included.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

MODEL = "micro-llama"  # ~800 encrypted output values per token: a step of 12 tokens takes about a minute


@dataclass(frozen=True)
class DemoConfig:
    out: Path = Path("runs/demo")
    steps: int = 4
    seq_len: int = 12
    seed: int = 0


def _write_data(path: Path) -> None:
    from hetune.data.corpus import stdlib_text

    text = stdlib_text(40_000)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"text": text[i : i + 500]}) + "\n" for i in range(0, len(text), 500)))


def run_demo(cfg: DemoConfig = DemoConfig(), echo=print) -> dict:
    from hetune.compile.bundle import load_bundle, write_bundle
    from hetune.compile.compiler import CompileConfig, compile_model
    from hetune.models.loading import load_model
    from hetune.protocols.hybrid_lora.plots import plot_losses
    from hetune.protocols.hybrid_lora.server import LoopbackWorker
    from hetune.protocols.hybrid_lora.train import TrainConfig, read_metrics, train

    out = cfg.out
    data = out / "data" / "train.jsonl"
    _write_data(data)
    echo(f"[1/4] compiling {MODEL} into a worker bundle")
    compiled = compile_model(load_model(MODEL, seed=cfg.seed), CompileConfig(calibration_tokens=64, seed=cfg.seed))
    bundle_dir = out / "bundle"
    write_bundle(bundle_dir, compiled.manifest, compiled.tensors, compiled.report, overwrite=True)

    common = dict(model=MODEL, data=(str(data),), seq_len=cfg.seq_len, batch_size=1, steps=cfg.steps, lr=5e-3,
                  warmup_steps=1, eval_every=cfg.steps, save_every=cfg.steps, eval_batches=1, seed=cfg.seed)
    echo("[2/4] starting a worker on loopback")
    worker = LoopbackWorker(load_bundle(bundle_dir))
    try:
        echo(f"[3/4] {cfg.steps} private LoRA steps against {worker.url} (real GLWE encryption)")
        remote = train(TrainConfig(out=out / "remote", backend="remote", workers=(worker.url,), **common))
    finally:
        worker.stop()
    echo("[4/4] the same steps in plaintext and on the bit-exact quantized backend")
    plain = train(TrainConfig(out=out / "plain", backend="plain", progress=False, **common))
    train(TrainConfig(out=out / "quantized", backend="quantized", bundle=bundle_dir, progress=False, **common))

    runs = {name: read_metrics(out / name) for name in ("plain", "quantized", "remote")}
    echo(f"\n{'step':>4} {'plain':>10} {'quantized':>10} {'encrypted':>10} {'gap':>8}")
    for p, q, r in zip(runs["plain"], runs["quantized"], runs["remote"]):
        echo(f"{p['step']:>4} {p['loss']:>10.4f} {q['loss']:>10.4f} {r['loss']:>10.4f} {(r['loss'] - p['loss']) / p['loss']:>+8.2%}")
    gap = (remote["final_eval_loss"] - plain["final_eval_loss"]) / plain["final_eval_loss"]
    echo(f"eval loss: plaintext {plain['final_eval_loss']:.4f}, encrypted {remote['final_eval_loss']:.4f} ({gap:+.2%})")
    stats = remote["backend_stats"]
    echo(f"the worker computed {stats['values_out']:,} encrypted output values; "
         f"{stats['bytes_sent'] / 1e6:.1f} MB sent, {stats['bytes_received'] / 1e6:.1f} MB received")
    labels = {"plain": "plaintext", "quantized": "quantized (clear integers)", "remote": "encrypted (remote worker)"}
    plot_losses({labels[k]: v for k, v in runs.items()}, out / "loss.png",
                "private LoRA fine-tuning: encrypted vs plaintext", markers=True)
    echo(f"loss plot: {out / 'loss.png'}\nadapter:   {remote['adapter']}  (PeftModel.from_pretrained(base, path))")
    return {"runs": runs, "eval_gap": gap, "plot": str(out / "loss.png"), "adapter": remote["adapter"]}
