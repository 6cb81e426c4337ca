"""Per-layer quantization error at 4/6/8 bits on the Llama-3.2-1B shape.

Question: how much error does HE-compatible quantization (per-channel signed weights,
per-token activations and gradients) add to each outsourced op, and how many
accumulator bits does it need against the 27-bit GLWE budget?

Runs the real compiler (hetune.compile) on ``llama-3.2-1b-shape`` (the real config,
random weights: the 1B checkpoint cannot be downloaded here) with activations from
real text (Python standard library sources through the model). Backward error uses
standard-normal output gradients.

    .venv/bin/python benchmarks/quant_error.py            # about 4 minutes on 2 cores
    .venv/bin/python benchmarks/quant_error.py --model tiny-llama --out /tmp/q.json

With ``--levers`` it compares, at 8-bit weights, the configurations of ``hetune converge
--levers`` (8-bit inputs, per-token clipping, Hadamard rotation, 12-bit inputs, both) on
a real model:

    .venv/bin/python benchmarks/quant_error.py --model smollm2-135m --levers \
        --out benchmarks/results/quant_error_smollm2.json
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from common import environment, write_json

from hetune.compile.compiler import CompileConfig, compile_model
from hetune.models.loading import load_model
from hetune.protocols.hybrid_lora.owner.converge import lever_configs, quant_label
from hetune.quant.config import QuantConfig


def summarize(rows: list[dict], budget: int) -> dict:
    fwd = [r["forward_rel_err"] for r in rows]
    bwd = [r["backward_rel_err"] for r in rows]
    bits = [max(r["forward_acc_bits"], r["backward_acc_bits"]) for r in rows]
    return {
        "forward_rel_err_mean": statistics.fmean(fwd), "forward_rel_err_max": max(fwd),
        "backward_rel_err_mean": statistics.fmean(bwd), "backward_rel_err_max": max(bwd),
        "acc_bits_max": max(bits), "generic_acc_bits_max": max(r["generic_acc_bits"] for r in rows),
        "ops_over_budget": sum(b > budget for b in bits),
        "worst_forward_op": rows[fwd.index(max(fwd))]["op"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="llama-3.2-1b-shape")
    parser.add_argument("--bits", default="4,6,8", help="comma-separated; weights, activations and gradients alike")
    parser.add_argument("--tokens", type=int, default=128, help="calibration tokens of real text")
    parser.add_argument("--levers", action="store_true", help="8-bit weights with each lever instead of --bits")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "quant_error.json")
    args = parser.parse_args()

    t0 = time.perf_counter()
    loaded = load_model(args.model, seed=0)
    load_s = time.perf_counter() - t0
    results = {}
    if args.levers:
        quants = {quant_label(q): q for q in lever_configs(QuantConfig(accept_overflow_risk=True))}
    else:
        # without rotation: the table in docs/benchmarks.md; --levers compares it with rotation
        quants = {b: QuantConfig(int(b), int(b), int(b), accept_overflow_risk=True, rotation="none") for b in args.bits.split(",")}
    for b, quant in quants.items():
        t = time.perf_counter()
        compiled = compile_model(loaded, CompileConfig(quant=quant, calibration_tokens=args.tokens), progress=False)
        budget = compiled.report["budget_bits"]
        results[b] = {"summary": summarize(compiled.report["ops"], budget), "ops": compiled.report["ops"],
                      "compile_s": time.perf_counter() - t}
        s = results[b]["summary"]
        print(f"{b}: fwd err mean {s['forward_rel_err_mean']:.2e} max {s['forward_rel_err_max']:.2e}, "
              f"bwd err mean {s['backward_rel_err_mean']:.2e}, acc bits max {s['acc_bits_max']} "
              f"(any weights {s['generic_acc_bits_max']}), ops over {budget}-bit budget: {s['ops_over_budget']}")
    write_json(args.out, {
        "benchmark": "quant_error", "model": args.model, "calibration_tokens": args.tokens,
        "calibration_text": "Python standard library sources", "model_load_s": load_s,
        "environment": environment(), "results": results,
    })
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
