"""Time per private LoRA step and bytes per token, per backend, beside Concrete ML's LoraTrainer.

Question: what does one training step cost on each hetune backend, and how does the
encrypted step compare with Concrete ML 1.9's ``LoraTrainer(fhe="execute")`` on the
same model and tokens?

Workloads (LoRA r=8 on all seven linears of every block, batch 1):
- ``micro-llama`` (built-in, hidden 32): every backend measured, 3 tokens.
- ``glwe-block`` (1 block, hidden 1024, 8 heads / 4 KV heads, so every linear is >= 512
  wide, the size at which Concrete ML switches to its GLWE backend): plain, quantized,
  encrypted, remote and Concrete ML measured, 2 tokens.
- ``tiny-llama`` and ``llama-3.2-1b-shape`` with 1 block: plain and quantized measured at
  64 tokens; encrypted time *extrapolated* = output values the step needs (counted by
  the quantized run) x seconds per value measured on ``glwe-block``.

Encrypted steps are timed once (each takes minutes); plain and quantized take the
median of 5 steps after 1 warm-up. Key generation and session set-up are reported
apart from the step.

    .venv/bin/python benchmarks/step_time.py             # about 25 minutes on 2 cores
    .venv/bin/python benchmarks/step_time.py --quick     # micro-llama only, about 2 minutes
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from common import environment, write_json

from hetune.compile.bundle import load_bundle, write_bundle
from hetune.compile.compiler import CompileConfig, compile_model
from hetune.crypto.glwe import GlweKeys
from hetune.models.builtin import BUILTIN_CONFIGS, byte_tokenizer
from hetune.models.loading import load_model
from hetune.protocols.hybrid_lora.client import LORA_TARGETS, build_private_model
from hetune.protocols.hybrid_lora.server import LoopbackWorker

GLWE_BLOCK = dict(BUILTIN_CONFIGS["tiny-llama"], hidden_size=1024, intermediate_size=1024, num_hidden_layers=1,
                  num_attention_heads=8, num_key_value_heads=4)
ONE_B_BLOCK = dict(BUILTIN_CONFIGS["llama-3.2-1b-shape"], num_hidden_layers=1)


def save_model(config: dict, root: Path) -> str:
    """A random-weight model directory, loaded back through the real from_pretrained path."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**config)).save_pretrained(root)
    byte_tokenizer().save_pretrained(root)
    return str(root)


def make_bundle(model_id: str, root: Path) -> Path:
    compiled = compile_model(load_model(model_id), CompileConfig(calibration_tokens=32), progress=False)
    root.mkdir(parents=True, exist_ok=True)
    out = root / "bundle"
    write_bundle(out, compiled.manifest, compiled.tensors, compiled.report)
    return out


def one_step(pm, ids: torch.Tensor) -> float:
    t0 = time.perf_counter()
    pm.model.zero_grad(set_to_none=True)
    pm.model(input_ids=ids, labels=ids).loss.backward()
    return time.perf_counter() - t0


def measure(model_id, backend, ids, bundle=None, workers=(), keys=None, repeats=5) -> dict:
    t0 = time.perf_counter()
    pm = build_private_model(model_id, backend, bundle=bundle, workers=workers, keys=keys)
    setup = time.perf_counter() - t0
    encrypted = pm.backend.encrypted
    if not encrypted:
        one_step(pm, ids)  # warm-up
    times, stats = [], None
    for _ in range(1 if encrypted else repeats):
        before = pm.backend.stats.snapshot()
        times.append(one_step(pm, ids))
        after = pm.backend.stats.snapshot()
        stats = {k: after[k] - before[k] for k in after}
    pm.close()
    tokens = ids.numel()
    return {"backend": backend, "tokens": tokens, "step_s": statistics.median(times), "setup_s": setup,
            "steps_timed": len(times), "values_out": stats["values_out"], "round_trips": stats["round_trips"],
            "bytes_sent_per_token": stats["bytes_sent"] / tokens, "bytes_received_per_token": stats["bytes_received"] / tokens}


def concrete_ml_step(model_id: str, ids: torch.Tensor) -> dict:
    """The same step through Concrete ML's LoraTrainer, compiled at 8 bits, fhe='execute'."""
    from concrete.ml.torch.lora import LoraTrainer
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(load_model(model_id).model, LoraConfig(r=8, lora_alpha=16, target_modules=list(LORA_TARGETS)))

    def loss_fn(logits, labels):
        return torch.nn.functional.cross_entropy(logits[..., :-1, :].reshape(-1, logits.shape[-1]), labels[..., 1:].reshape(-1))

    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    with tempfile.TemporaryDirectory() as tmp:
        # GQA models fail Concrete ML's compile unless q/k/v of the first block skip backprop (see the spec)
        trainer = LoraTrainer(model, opt, loss_fn=loss_fn, n_layers_to_skip_for_backprop=3, train_log_path=f"{tmp}/log")
        t0 = time.perf_counter()
        trainer.compile({"input_ids": ids, "labels": ids}, n_bits=8)
        compile_s = time.perf_counter() - t0
        batch = [{"input_ids": ids, "labels": ids}]
        t0 = time.perf_counter()
        trainer.train(batch, num_epochs=1, fhe="execute")
        step_s = time.perf_counter() - t0
    uses_glwe = trainer.hybrid_model.executor is not None
    return {"backend": "concrete-ml LoraTrainer(fhe='execute')", "tokens": ids.numel(), "step_s": step_s,
            "compile_s": compile_s, "glwe_backend": uses_glwe}


def encrypted_workload(name, model_id, ids, bundle, keys, with_cml=True) -> dict:
    rows = [measure(model_id, "plain", ids), measure(model_id, "quantized", ids, bundle=bundle)]
    rows.append(measure(model_id, "encrypted", ids, bundle=bundle, keys=keys))
    worker = LoopbackWorker(load_bundle(bundle))
    try:
        rows.append(measure(model_id, "remote", ids, workers=(worker.url,), keys=keys))
    finally:
        worker.stop()
    result = {"workload": name, "model": model_id, "rows": rows}
    if with_cml:
        cml = concrete_ml_step(model_id, ids)
        rows.append(cml)
        enc = next(r for r in rows if r["backend"] == "encrypted")
        result["ratio_concrete_ml_over_hetune_encrypted"] = cml["step_s"] / enc["step_s"]
    enc = next(r for r in rows if r["backend"] == "encrypted")
    result["seconds_per_output_value"] = enc["step_s"] / enc["values_out"]
    for r in rows:
        print(f"  {name:<12} {r['backend']:<42} {r['step_s']:9.3f} s/step  ({r['tokens']} tokens)", flush=True)
    return result


def clear_workload(name, model_id, ids, bundle, seconds_per_value) -> dict:
    rows = [measure(model_id, "plain", ids), measure(model_id, "quantized", ids, bundle=bundle)]
    q = rows[1]
    rows.append({"backend": "encrypted (extrapolated)", "tokens": q["tokens"], "values_out": q["values_out"],
                 "step_s": q["values_out"] * seconds_per_value, "extrapolated": True})
    for r in rows:
        print(f"  {name:<12} {r['backend']:<42} {r['step_s']:9.3f} s/step  ({r['tokens']} tokens)", flush=True)
    return {"workload": name, "model": model_id, "rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="micro-llama only")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "step_time.json")
    args = parser.parse_args()
    keys = GlweKeys.generate()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        results.append(encrypted_workload("micro-llama", "micro-llama", torch.tensor([[72, 101, 108]]),
                                          make_bundle("micro-llama", root / "micro"), keys))
        if not args.quick:
            glwe_dir = save_model(GLWE_BLOCK, root / "glwe-block")
            glwe = encrypted_workload("glwe-block", glwe_dir, torch.tensor([[72, 101]]), make_bundle(glwe_dir, root / "glwe"), keys)
            results.append(glwe)
            spv = glwe["seconds_per_output_value"]
            ids64 = torch.randint(0, 256, (1, 64), generator=torch.Generator().manual_seed(0))
            results.append(clear_workload("tiny-llama", "tiny-llama", ids64, make_bundle("tiny-llama", root / "tiny"), spv))
            one_b = save_model(ONE_B_BLOCK, root / "1b-block")
            results.append(clear_workload("1b-block", one_b, ids64, make_bundle(one_b, root / "1b"), spv))
    write_json(args.out, {"benchmark": "step_time", "environment": environment(), "workloads": results})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
