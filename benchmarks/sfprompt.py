"""SFPrompt against federated full fine-tuning: accuracy, client compute, communication.

Question: how close does SFPrompt's accuracy come to federated full fine-tuning (FL),
and what share of FL's client compute and communication does it need?

Three parts:
- Measured, the real pretrained SmolLM2-135M (``--part smollm2``) on the federated
  ``knowledge`` task (the company's facts split by topic over 2 clients; held-out
  phrasings scored by exact match, eval loss on them): SFPrompt against federated LoRA
  and federated full fine-tuning of the same model, per-round bytes from the serialized
  messages, analytic client FLOPs, wall time and the peak memory of the whole process
  tree (driver, body server thread, Ray actors).
- Measured, tiny-vit on scikit-learn's digits (4 clients, Dirichlet alpha 0.5, 10
  rounds, seed 0): SFPrompt and every baseline in the same harness (FL full, federated
  prompt tuning without split, split-fed without pruning / local loss, local-only).
  Bytes are counted from the serialized messages (HTTP bodies, Flower ArrayRecords);
  client FLOPs are analytic per stage times the samples each stage processed.
- Analytic, the paper's backbones ViT-B/16 and ViT-L/16 (real configs, no weights):
  client FLOPs and bytes per client per round for a stated workload.

    .venv/bin/python benchmarks/sfprompt.py --part smollm2   # about 5 minutes on 2 quiet cores
    .venv/bin/python benchmarks/sfprompt.py --part smollm2 --task text   # stdlib docstrings, 32 per client
    .venv/bin/python benchmarks/sfprompt.py --task text --sweep   # SFPrompt's step sizes, local-loss on/off: about 13 minutes
    .venv/bin/python benchmarks/sfprompt.py --rounds 6 --methods sfprompt,fl-lora   # longer, without fl-full
    .venv/bin/python benchmarks/sfprompt.py --part toy       # about 12 minutes on 2 cores
    .venv/bin/python benchmarks/sfprompt.py --part toy --quick    # 3 rounds, about 2 minutes
"""

from __future__ import annotations

import argparse
import threading
import time
from pathlib import Path

from common import environment, write_json

from hetune.protocols.sfprompt import accounting
from hetune.protocols.sfprompt.config import SfpromptConfig
from hetune.protocols.sfprompt.run import run

# (label, method, config overrides); FL's learning rate is also run at 3x the default
RUNS = [(m, m, {}) for m in ("fl-full", "sfprompt", "split-fed", "fed-prompt", "local-only")] + [
    ("fl-full-lr3e-3", "fl-full", {"full_lr": 3e-3})]

# Analytic workload for the paper's backbones: 10 prompt tokens, gamma 0.5, one
# local-loss epoch, one split epoch; FL trains every weight for one epoch. Split traffic
# grows with the samples a client holds, so it is given for 100, 250 and 500 per client
# (250: e.g. 50,000 CIFAR images over 200 clients).
PAPER_WORKLOAD = dict(prompts=10, gamma=0.5, local_epochs=1, epochs=1)
SAMPLES_PER_CLIENT = (100, 250, 500)


def analytic(model: str, cut: tuple[int, int], samples: int) -> dict:
    w = {**PAPER_WORKLOAD, "samples": samples}
    n, kept = w["samples"], int(w["gamma"] * w["samples"])
    fl_flops = accounting.round_flops(accounting.costs(model, cut, 0), "fl-full", n, w["epochs"], 0, n)
    sf_flops = accounting.round_flops(accounting.costs(model, cut, w["prompts"]), "sfprompt", n, w["epochs"], w["local_epochs"], kept)
    fl_bytes = accounting.round_bytes(model, cut, 0, "fl-full", n, w["epochs"], n)
    sf_bytes = accounting.round_bytes(model, cut, w["prompts"], "sfprompt", n, w["epochs"], kept)
    c = accounting.costs(model, cut, w["prompts"])
    per_sample = 4 * c.positions * c.hidden * accounting.FLOAT_BYTES * w["epochs"]
    params = accounting.param_counts(model, cut, w["prompts"])
    return {
        "model": model, "cut": list(cut), "workload": w, "params": params,
        "fl_client_gflops_per_round": fl_flops / 1e9, "sfprompt_client_gflops_per_round": sf_flops / 1e9,
        "client_flops_share_of_fl": sf_flops / fl_flops,
        "fl_mb_per_round": fl_bytes / 1e6, "sfprompt_mb_per_round": sf_bytes / 1e6,
        "communication_ratio_vs_fl": sf_bytes / fl_bytes,
        # kept samples per round at which SFPrompt's traffic equals FL's
        "break_even_kept_samples": (fl_bytes - 2 * params["prompts_and_tail"] * accounting.FLOAT_BYTES) / per_sample,
    }


# The real model: every method from the same pretrained weights, data and seed.
SMOLLM2 = dict(model="smollm2-135m", task="knowledge", clients=2, rounds=2, batch_size=8, seed=0)
# real text: the standard library's docstrings split by package, 32 training documents per client
# (the knowledge task's size: 36 lines per client)
SMOLLM2_TASKS = {"knowledge": SMOLLM2, "text": {**SMOLLM2, "task": "text", "max_docs": 32}}
SMOLLM2_METHODS = ("sfprompt", "fl-lora", "fl-full")
# fl-full holds two whole trainable copies (weights, gradients, AdamW state) plus Flower's copies of
# every update: with both clients at once it crossed the 24 GB machine's limit (Ray killed one), so
# its clients run one at a time
CLIENT_CPUS = {"fl-full": 2.0}


# SFPrompt's own step sizes and its local-loss update on the real model: (local-loss epochs, prompts' lr, tail's lr)
SWEEP = [(local, lr, tail) for local in (1, 0)
         for lr, tail in ((3e-3, 3e-3), (1e-3, 1e-3), (3e-4, 3e-4), (1e-3, 5e-5), (1e-4, 1e-3))]


def sweep(out: Path, task: str) -> None:
    """SFPrompt alone over SWEEP, in the benchmark's setting otherwise: which steps learn on a pretrained LM."""
    import os

    rows = []
    for local, lr, tail in SWEEP:
        start = time.perf_counter()
        s = run(SfpromptConfig(method="sfprompt", local_epochs=local, lr=lr, tail_lr=tail, **SMOLLM2_TASKS[task]))
        rows.append({"local_epochs": local, "lr": lr, "tail_lr": tail, "eval_loss_by_round": [r["loss"] for r in s["rounds"]],
                     "accuracy_by_round": [r["accuracy"] for r in s["rounds"]], "wall_s": round(time.perf_counter() - start, 1),
                     "load_avg_1m_after": os.getloadavg()[0]})
        print(f"local-loss epochs {local}, prompts {lr:g}, tail {tail:g}: eval loss "
              f"{[round(x, 3) for x in rows[-1]['eval_loss_by_round']]}", flush=True)
    write_json(out, {"question": "SFPrompt on SmolLM2: eval loss by step size and local-loss update",
                     "environment": environment(), "setting": SMOLLM2_TASKS[task], "runs": rows})


class PeakMemory:
    """Peak resident memory of this process and all its descendants (Ray actors), sampled every 0.5 s."""

    def __init__(self):
        import psutil

        self.me, self.peak, self._stop = psutil.Process(), 0, threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        import psutil

        while not self._stop.wait(0.5):
            total = 0
            for proc in [self.me, *self.me.children(recursive=True)]:
                try:
                    total += proc.memory_info().rss
                except psutil.Error:
                    pass
            self.peak = max(self.peak, total)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def smollm2(out: Path, plot: Path, methods: tuple[str, ...] = SMOLLM2_METHODS, task: str = "knowledge",
            rounds: int | None = None) -> None:
    """Runs ``methods``; with a subset, the others are kept from ``out`` (e.g. a rerun of one that lost a client)."""
    import json
    import os

    setting = {**SMOLLM2_TASKS[task], **({"rounds": rounds} if rounds else {})}
    load = [os.getloadavg()[0]]
    previous = json.loads(out.read_text())["methods"] if out.exists() and set(methods) != set(SMOLLM2_METHODS) else {}
    measured = {m: previous[m] for m in SMOLLM2_METHODS if m in previous and m not in methods}
    for method in methods:
        start = time.perf_counter()
        with PeakMemory() as mem:
            s = run(SfpromptConfig(method=method, client_cpus=CLIENT_CPUS.get(method, 1.0), **setting))
        load.append(os.getloadavg()[0])
        rows = s["rounds"]
        measured[method] = {
            "exact_match_by_round": [r["accuracy"] for r in rows], "eval_loss_by_round": [r["loss"] for r in rows],
            "bytes_by_round": [sum(r["bytes"].values()) for r in rows[1:]], "bytes_total": s["bytes_total"],
            "bytes_sum": sum(s["bytes_total"].values()), "body_server_bytes": s["body_server_bytes"],
            "client_flops_per_round": s["client_flops_per_round_mean"], "kept_by_round": [r.get("kept") for r in rows[1:]],
            "clients_ok_by_round": [r["clients_ok"] for r in rows[1:]], "git_sha": environment()["git_sha"],
            "params": s["params"], "config": s["config"], "wall_s": round(time.perf_counter() - start, 1),
            "peak_rss_gb": round(mem.peak / 2**30, 2),
        }
        m = measured[method]
        print(f"{method:9s} exact match {m['exact_match_by_round']} eval loss {[round(x, 4) for x in m['eval_loss_by_round']]} "
              f"{m['bytes_sum'] / 1e6:.1f} MB flops/round {m['client_flops_per_round']:.3g} {m['wall_s']:.0f} s "
              f"peak {m['peak_rss_gb']} GB", flush=True)
    measured = {m: measured[m] for m in SMOLLM2_METHODS if m in measured}
    fl = measured.get("fl-full")  # absent from a longer run of the cheaper methods
    for m in measured.values() if fl else ():
        m["client_flops_share_of_fl"] = m["client_flops_per_round"] / fl["client_flops_per_round"]
        m["bytes_ratio_vs_fl"] = m["bytes_sum"] / fl["bytes_sum"]
    write_json(out, {
        "question": "SFPrompt vs federated LoRA and full fine-tuning on the real SmolLM2-135M: exact match, eval loss, "
                    "client FLOPs, traffic, time, memory",
        "environment": environment(), "load_avg_1m_before_and_after_each_method": load,
        "setting": setting, "methods": measured,
    })
    _plot_smollm2(measured, plot, task)


def _plot_smollm2(measured: dict, path: Path, task: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from hetune.files import save_figure

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for method, m in measured.items():
        rounds = range(len(m["eval_loss_by_round"]))
        axes[0].plot(rounds, m["eval_loss_by_round"], "-o", label=method)
        axes[1].plot(rounds, [a * (6 if task == "knowledge" else 1) for a in m["exact_match_by_round"]], "-o", label=method)
    names = list(measured)
    axes[2].bar(names, [measured[n]["bytes_sum"] / 1e6 for n in names])
    axes[2].set_yscale("log")
    axes[0].set(xlabel="round", ylabel="held-out eval loss")
    axes[1].set(xlabel="round", ylabel="held-out exact match (of 6)" if task == "knowledge" else "next-token accuracy")
    axes[2].set(ylabel="traffic, all rounds (MB)")
    axes[0].legend()
    fig.suptitle(f"SmolLM2-135M, {task} task, 2 clients")
    fig.tight_layout()
    save_figure(fig, path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--part", choices=("smollm2", "toy"), default="smollm2")
    parser.add_argument("--quick", action="store_true", help="toy: 3 rounds")
    parser.add_argument("--methods", default=",".join(SMOLLM2_METHODS), help="smollm2: the methods to (re)run")
    parser.add_argument("--task", choices=tuple(SMOLLM2_TASKS), default="knowledge", help="smollm2: the federated task")
    parser.add_argument("--rounds", type=int, default=None, help="smollm2: rounds (default 2); results get a _rN suffix")
    parser.add_argument("--sweep", action="store_true", help="smollm2: SFPrompt alone over SWEEP (step sizes, local-loss on/off)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if args.sweep:
        sweep(args.out or Path(f"benchmarks/results/sfprompt_smollm2_{args.task}_sweep.json"), args.task)
        return
    if args.part == "smollm2":
        name = "sfprompt_smollm2" + ("" if args.task == "knowledge" else f"_{args.task}") + (f"_r{args.rounds}" if args.rounds else "")
        smollm2(args.out or Path(f"benchmarks/results/{name}.json"), Path(f"docs/img/{name}.png"),
                tuple(args.methods.split(",")), args.task, args.rounds)
        return
    args.out = args.out or Path("benchmarks/results/sfprompt.json")
    rounds = 3 if args.quick else 10

    # warm-up: imports, dataset, model build and one Flower start, not timed
    run(SfpromptConfig(method="fed-prompt", clients=2, rounds=1))
    measured = {}
    for label, method, extra in RUNS:
        start = time.perf_counter()
        s = run(SfpromptConfig(model="tiny-vit", method=method, clients=4, rounds=rounds, alpha=0.5, seed=0, **extra))
        method = label
        measured[method] = {
            "final_accuracy": s["final_accuracy"], "best_accuracy": s["best_accuracy"],
            "accuracy_by_round": [r["accuracy"] for r in s["rounds"]],
            "bytes_total": s["bytes_total"], "bytes_sum": sum(s["bytes_total"].values()),
            "client_flops_per_round": s["client_flops_per_round_mean"], "wall_s": time.perf_counter() - start,
        }
        print(f"{method:10s} acc {s['final_accuracy']:.4f} bytes {measured[method]['bytes_sum'] / 1e6:8.2f} MB "
              f"flops/round {s['client_flops_per_round_mean']:.3g} {measured[method]['wall_s']:.0f}s", flush=True)
    fl = measured["fl-full"]
    for m in measured.values():
        m["accuracy_minus_fl"] = m["final_accuracy"] - fl["final_accuracy"]
        m["client_flops_share_of_fl"] = m["client_flops_per_round"] / fl["client_flops_per_round"]
        m["bytes_ratio_vs_fl"] = m["bytes_sum"] / fl["bytes_sum"] if m["bytes_sum"] else 0.0
        m["wall_ratio_vs_fl"] = m["wall_s"] / fl["wall_s"]
    paper = [analytic(model, cut, n) for model in ("vit-b16", "vit-l16") for cut in ((0, 0), (1, 1)) for n in SAMPLES_PER_CLIENT]
    for p in paper:
        print(f"{p['model']} cut {p['cut']} n {p['workload']['samples']}: client FLOPs {100 * p['client_flops_share_of_fl']:.2f}% of FL, "
              f"traffic {p['communication_ratio_vs_fl']:.3f}x FL", flush=True)
    write_json(args.out, {
        "question": "SFPrompt vs federated full fine-tuning: accuracy, client FLOPs, communication",
        "environment": environment(),
        "measured": {"model": "tiny-vit", "data": "sklearn digits, 75/25 split", "clients": 4, "alpha": 0.5,
                     "rounds": rounds, "seed": 0, "defaults": SfpromptConfig().to_dict(), "methods": measured},
        "analytic_paper_backbones": paper,
    })


if __name__ == "__main__":
    main()
