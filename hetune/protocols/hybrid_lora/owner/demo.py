"""``hetune demo``: private fine-tuning of a real pretrained LLM, offline, in one command.

SmolLM2-135M-Instruct (shipped as a GGUF file by a pip package) learns a fictional
company's internal facts, which no pretrained model can know. The demo compiles a
worker bundle, starts a worker on loopback, runs the first private LoRA steps with
real batched-RLWE encryption through it, and shows that they equal the bit-exact
``quantized`` backend's steps bit for bit (losses and adapter); the remaining steps
continue on ``quantized`` from that checkpoint (the same arithmetic, minutes instead
of hours on 2 CPU cores), and the screen says so. The same steps run in plaintext
from the same seed. It prints the losses side by side and the model's answers to
held-out questions before and after, and writes a plot and the adapter. The worker is
stopped on exit, Ctrl-C included.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class DemoConfig:
    out: Path = Path("runs/demo")
    model: str = "smollm2-135m"
    steps: int = 24
    encrypted_steps: int = 2  # the first steps go through the encrypted worker; the rest run on `quantized` (2: about 7 min in all on 2 cores)
    seq_len: int = 64
    batch_size: int = 4
    lr: float = 3e-3
    seed: int = 0


def _write_data(path: Path, task) -> None:
    from hetune.files import write_atomic

    write_atomic(path, "".join(json.dumps({"text": p.text}) + "\n" for p in task.train))


def _answers(model, tokenizer, questions) -> list[str]:
    from hetune.data.arithmetic import greedy_answer

    model.eval()
    return [greedy_answer(model, tokenizer, q.prompt, max_new_tokens=6) for q in questions]


def _same_adapters(a: Path, b: Path) -> bool:
    import torch
    from safetensors.torch import load_file

    wa, wb = load_file(str(a / "adapter_model.safetensors")), load_file(str(b / "adapter_model.safetensors"))
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def _compile(cfg: DemoConfig, echo):
    """[1/5] The worker bundle; a GGUF model is also saved as a directory, so the runs below read it once.
    Returns the loaded float model, the model id the runs load, and the bundle directory."""
    from hetune.compile.compiler import CompileConfig, compile_bundle
    from hetune.models.builtin import BUILTIN_GGUF
    from hetune.models.loading import load_model

    compile_cfg = CompileConfig(calibration_tokens=64, seed=cfg.seed)
    q = compile_cfg.quant
    echo(f"[1/5] compiling {cfg.model} into a worker bundle ({q.bits_w}-bit weights, inputs up to {q.bits_a} bits, "
         f"{q.rotation} rotation, batched RLWE p128)")
    base = load_model(cfg.model, seed=cfg.seed)
    model_id = cfg.model
    if cfg.model.endswith(".gguf") or cfg.model in BUILTIN_GGUF:  # read the GGUF once, not in every run below
        model_id = str(cfg.out / "model")
        base.model.save_pretrained(model_id)
        base.tokenizer.save_pretrained(model_id)
    bundle_dir = cfg.out / "bundle"
    compile_bundle(base, bundle_dir, compile_cfg, overwrite=True, progress=False)
    return base, model_id, bundle_dir


def _encrypted_steps(cfg: DemoConfig, common: dict, bundle_dir: Path, k: int, echo) -> tuple[dict, bool]:
    """[3/5] The first ``k`` steps through a loopback worker, and whether they equal ``quantized``'s bit for bit."""
    from hetune.compile.bundle import load_bundle
    from hetune.protocols.hybrid_lora.owner.train import TrainConfig, latest_checkpoint, read_metrics, train
    from hetune.protocols.hybrid_lora.worker.server import LoopbackWorker

    private, check = cfg.out / "private", cfg.out / "quantized-check"
    worker = LoopbackWorker(load_bundle(bundle_dir))
    try:
        echo(f"[3/5] {k} private LoRA step(s) with real encryption against a worker on {worker.url}")
        remote = train(TrainConfig(out=private, backend="remote", workers=(worker.url,), stop_after=k, overwrite=True, **common))
    finally:
        worker.stop()
    stats = remote["backend_stats"]
    train(TrainConfig(out=check, backend="quantized", bundle=bundle_dir, stop_after=k, progress=False, overwrite=True, **common))
    enc_rows, check_rows = read_metrics(private), read_metrics(check)
    exact = [r["loss"] for r in enc_rows] == [r["loss"] for r in check_rows] and _same_adapters(
        latest_checkpoint(private) / "adapter", latest_checkpoint(check) / "adapter")
    echo(f"      encrypted steps 1-{k} equal the quantized backend's bit for bit (losses and adapter): {exact}")
    echo(f"      the worker computed {stats['values_out']:,} output values; {stats['bytes_sent'] / 1e6:.0f} MB sent, "
         f"{stats['bytes_received'] / 1e6:.0f} MB received; client crypto {stats['encrypt_s'] + stats['decrypt_s']:.0f} s, "
         f"worker {stats['worker_s']:.0f} s")
    return remote, exact


def _held_out_scores(base, task, adapters: dict[str, str], before: list[str], echo) -> dict[str, int]:
    """[5/5] Answers to the held-out questions with each adapter on the float base; correct counts by name."""
    from peft import PeftModel

    tuned = PeftModel.from_pretrained(base.model, adapters["private"], adapter_name="private")  # float base + adapter
    after = _answers(tuned, base.tokenizer, task.held_out)
    tuned.load_adapter(adapters["plaintext"], adapter_name="plaintext")
    tuned.set_adapter("plaintext")
    after_plain = _answers(tuned, base.tokenizer, task.held_out)
    for q, b, a in zip(task.held_out, before, after):
        echo(f"  Q: {q.question}\n     truth {q.answer!s:<11} before {b!s:<14} after {a}")
    return {name: sum(x == str(q.answer) for x, q in zip(ans, task.held_out)) for name, ans in
            (("before", before), ("after", after), ("after_plaintext", after_plain))}


def run_demo(cfg: DemoConfig = DemoConfig(), echo=print) -> dict:
    from hetune.data.knowledge import COMPANY, make_knowledge_task
    from hetune.protocols.hybrid_lora.owner.plots import plot_losses
    from hetune.protocols.hybrid_lora.owner.train import TrainConfig, read_metrics, train

    out, k = cfg.out, min(cfg.encrypted_steps, cfg.steps)
    task = make_knowledge_task(cfg.seed)
    data = out / "data" / "train.jsonl"
    _write_data(data, task)
    base, model_id, bundle_dir = _compile(cfg, echo)
    echo(f"[2/5] the base model's answers to {len(task.held_out)} held-out questions about {COMPANY}'s internal facts")
    before = _answers(base.model, base.tokenizer, task.held_out)

    common = dict(model=model_id, data=(str(data),), seq_len=cfg.seq_len, batch_size=cfg.batch_size, steps=cfg.steps,
                  lr=cfg.lr, warmup_steps=2, eval_every=cfg.steps, save_every=cfg.steps, eval_batches=2, seed=cfg.seed)
    private = out / "private"
    remote, exact = _encrypted_steps(cfg, common, bundle_dir, k, echo)
    if k < cfg.steps:
        echo(f"[4/5] steps {k + 1}-{cfg.steps} continue on the bit-exact quantized backend (same arithmetic, in the clear, "
             "to fit this demo in minutes on 2 CPU cores), then the same steps in plaintext")
        private_run = train(TrainConfig(out=private, backend="quantized", bundle=bundle_dir, progress=False, **common), resume=True)
    else:
        echo("[4/5] the same steps in plaintext")
        private_run = remote
    plain = train(TrainConfig(out=out / "plain", backend="plain", progress=False, overwrite=True, **common))

    runs = {"plain": read_metrics(out / "plain"), "private": read_metrics(private)}
    echo(f"\n{'step':>4} {'plaintext':>10} {'private':>10} {'gap':>8}")
    for p, r in zip(runs["plain"], runs["private"]):
        how = "encrypted" if r["step"] <= k else "quantized"
        echo(f"{p['step']:>4} {p['loss']:>10.4f} {r['loss']:>10.4f} {(r['loss'] - p['loss']) / p['loss']:>+8.2%}  {how}")
    gap = (private_run["final_eval_loss"] - plain["final_eval_loss"]) / plain["final_eval_loss"]
    echo(f"eval loss: plaintext {plain['final_eval_loss']:.4f}, private {private_run['final_eval_loss']:.4f} ({gap:+.2%})")

    echo("[5/5] answers to held-out questions, before and after private fine-tuning")
    score = _held_out_scores(base, task, {"private": private_run["adapter"], "plaintext": plain["adapter"]}, before, echo)
    n = len(task.held_out)
    echo(f"correct: base model {score['before']}/{n}, privately fine-tuned {score['after']}/{n}, "
         f"plaintext fine-tuned {score['after_plaintext']}/{n}")
    plot_losses({"plaintext": runs["plain"], f"private (steps 1-{k} encrypted)": runs["private"]}, out / "loss.png",
                f"private LoRA fine-tuning of {cfg.model}: private vs plaintext", markers=True)
    echo(f"loss plot: {out / 'loss.png'}\nadapter:   {private_run['adapter']}  (PeftModel.from_pretrained(base, path))")
    return {"runs": runs, "eval_gap": gap, "encrypted_equals_quantized": exact, "correct": score, "held_out": n,
            "plot": str(out / "loss.png"), "adapter": private_run["adapter"]}
