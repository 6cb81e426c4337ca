"""SHE-LoRA: per-round upload bytes, encryption and server time versus full HE; accuracy versus FlexLoRA.

Part 1 (cost): one rank-8 client's upload on the LoRA shapes of tiny-llama and of the
real Llama-3.2-1B configuration (q_proj and v_proj of every block), real CKKS
(N=8192, TenSEAL), warm-up then the median of 3 timed builds; then the server's
aggregation of that one upload (SHE-LoRA: one encrypted vector-matrix product per
layer and output chunk, with rotations; full HE: a weighted sum), warm-up then the
median of 2 (1 on the 1B shapes, where one takes tens of seconds). Full HE is
measured with dense packing (every LoRA parameter, N/2 per ciphertext: the strongest
baseline); the reference's one-ciphertext-per-column convention is a secondary row,
timed on 200 column encryptions and scaled to the column count (``extrapolated``).
The one-time set-up (public context the server receives, with and without Galois
keys) is reported separately, not per round.

Part 2 (accuracy): the four methods federated on Flower's simulation engine, same
seed, same clients (micro-llama, digits, Dirichlet alpha 0.3).

``--smollm2``: the real setting instead. SmolLM2-135M, task ``knowledge`` (the
company's facts, each topic held by one client; held-out phrasings) or ``text`` (the
standard library's docstrings, each package held by one client; a tenth of each held
out): the four federated methods plus the centralized and local-only references, per
round held-out exact match (knowledge) or next-token accuracy (text) and eval loss;
for knowledge also the cost of one client's upload on SmolLM2's LoRA shapes and DAGER's
first-layer span check against one client (``attack.token_recovery``): recall of the
client's tokens and of its words. Torch runs one
thread per process (Ray gives each client one CPU; on 2 shared cores more threads only
thrash). Writes ``results/she_lora_smollm2[_text].json`` and
``docs/img/she_lora_smollm2[_text].png``.

    .venv/bin/python benchmarks/she_lora.py            # both parts (toy)
    .venv/bin/python benchmarks/she_lora.py --cost-only
    .venv/bin/python benchmarks/she_lora.py --smollm2 --rounds 8               # the real model, knowledge
    .venv/bin/python benchmarks/she_lora.py --smollm2 --task text --rounds 8   # the real model, stdlib text
    .venv/bin/python benchmarks/she_lora.py --smollm2 --part attack  # only the attack (token and word recall)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, write_json  # noqa: E402

OUT = Path(__file__).resolve().parent / "results" / "she_lora.json"
OUT_SMOLLM2 = OUT.with_name("she_lora_smollm2.json")
PLOT_SMOLLM2 = Path(__file__).resolve().parent.parent / "docs" / "img" / "she_lora_smollm2.png"
SMOLLM2_RUN = {"model": "smollm2-135m", "task": "knowledge", "clients": 2, "rounds": 3, "local_steps": 5,
               "batch_size": 4, "seq_len": 32, "lr": 1e-2}
# the text task at its own default learning rate (TASK_DEFAULTS): pretrained prose needs a gentler step
SMOLLM2_TEXT_RUN = {**SMOLLM2_RUN, "task": "text", "lr": 3e-3}
ALL_METHODS = "flexlora,she-lora,full-he,maskcrypt,centralized,local-only"


def smollm2_paths(task: str) -> tuple[Path, Path]:
    """Where the real run of ``task`` writes its JSON and plot."""
    if task == "knowledge":
        return OUT_SMOLLM2, PLOT_SMOLLM2
    return OUT_SMOLLM2.with_name(f"she_lora_smollm2_{task}.json"), PLOT_SMOLLM2.with_name(f"she_lora_smollm2_{task}.png")


def lora_shapes(model: str) -> dict[str, tuple[int, int]]:
    from hetune.models.loading import load_config

    c = load_config(model)
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    shapes = {}
    for i in range(c.num_hidden_layers):
        shapes[f"layers.{i}.self_attn.q_proj"] = (c.num_attention_heads * head_dim, c.hidden_size)
        shapes[f"layers.{i}.self_attn.v_proj"] = (c.num_key_value_heads * head_dim, c.hidden_size)
    return shapes


def upload_cost(model: str, budget: int, rank: int = 8, repeats: int = 3) -> dict:
    import tenseal as ts
    import torch

    from hetune.protocols.she_lora import client, wire
    from hetune.protocols.she_lora.config import SheLoraConfig
    from hetune.protocols.she_lora.keys import load_public_context, load_secret_context, setup_keys

    shapes = lora_shapes(model)
    rng = np.random.default_rng(0)
    factors = {name: (rng.normal(size=(m, rank)), rng.normal(size=(rank, n))) for name, (m, n) in shapes.items()}
    head = SimpleNamespace(head=SimpleNamespace(weight=torch.zeros(10, 8), bias=torch.zeros(10)))
    meta_in = {"rank_max": rank, "shapes": shapes, "subsets": {name: list(range(budget)) for name in shapes}}
    lora_params = sum(rank * (m + n) for m, n in shapes.values())
    out = {"model_shapes": model, "layers": len(shapes), "rank": rank, "budget_columns": budget, "lora_params": lora_params}
    with tempfile.TemporaryDirectory() as tmp:
        ckks = SheLoraConfig(out=Path(tmp)).ckks
        keys = setup_keys(Path(tmp) / "rot", ckks)
        plain_keys = setup_keys(Path(tmp) / "norot", ckks, galois=False)
        secret, public = load_secret_context(keys.secret), load_public_context(keys.public)
        out["setup_bytes"] = {"public_ctx_with_galois": keys.public.stat().st_size,
                              "public_ctx_without_galois": plain_keys.public.stat().st_size}
        for method in ("she-lora", "full-he", "flexlora"):
            cfg = SheLoraConfig(out=Path(tmp), method=method, ranks=(rank,), budgets=(budget,))
            build = lambda: client.build_upload(cfg, 0, 1, meta_in, factors, head, secret, 100)  # noqa: E731
            data = build()  # warm-up
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                data = build()
                times.append(time.perf_counter() - t0)
            blobs = wire.unpack(data)[2]
            out[method] = {"bytes_up": len(data), "ciphertexts": sum(len(v) for v in blobs.values()),
                           "enc_time_s": statistics.median(times)}
            out[method].update(server_cost(cfg, shapes, rank, budget, data, public, 1 if len(shapes) > 8 else 2))
        out["she-lora"]["encrypted_share"] = rank * budget * len(shapes) / lora_params
        # reference convention: each column of A (r values) and of B (m values) its own ciphertext
        columns = sum(n + rank for _, n in shapes.values())
        sample = min(200, columns)
        t0 = time.perf_counter()
        size = sum(len(ts.ckks_vector(secret, rng.normal(size=rank).tolist()).serialize()) for _ in range(sample))
        per = (time.perf_counter() - t0) / sample
        out["full-he-per-column"] = {"ciphertexts": columns, "bytes_up": int(size / sample * columns),
                                     "enc_time_s": per * columns, "extrapolated_from": sample}
    for base in ("full-he", "full-he-per-column"):
        out[f"she_vs_{base}"] = {
            "bytes_change": out["she-lora"]["bytes_up"] / out[base]["bytes_up"] - 1,
            "enc_time_change": out["she-lora"]["enc_time_s"] / out[base]["enc_time_s"] - 1,
        }
    out["she_vs_full-he"]["server_time_ratio"] = out["she-lora"]["server_time_s"] / out["full-he"]["server_time_s"]
    out["she_vs_full-he"]["bytes_down_change"] = out["she-lora"]["bytes_down"] / out["full-he"]["bytes_down"] - 1
    return out


def server_cost(cfg, shapes, rank: int, budget: int, data: bytes, public, repeats: int) -> dict:
    """Aggregate one client's upload (the server's work per client and round), warm-up then median."""
    from hetune.protocols.she_lora import wire
    from hetune.protocols.she_lora.strategy import SheLoraStrategy

    def once():
        strategy = SheLoraStrategy(cfg, shapes, (10, 8), public if cfg.encrypts else None)
        meta = {"client": 0, "rank": rank, "budget": budget, "n_samples": 100,
                "top": {name: list(range(budget)) for name in shapes}}
        strategy.register([(1, wire.pack(meta), None)])
        row = strategy.aggregate(1, [(1, data, {"n_samples": 100, "train_loss": 0.0, "enc_time_s": 0.0, "dec_time_s": 0.0})], 0)
        assert row["clients_accepted"] == 1, strategy.rejections
        return row["agg_time_s"], strategy.round_payload(2)

    once()  # warm-up
    runs = [once() for _ in range(repeats)]
    down = runs[-1][1]
    return {"server_time_s": statistics.median(t for t, _ in runs), "server_repeats": repeats, "bytes_down": len(down),
            "ciphertexts_down": sum(len(v) for v in wire.unpack(down)[2].values())}


def accuracy_runs(rounds: int, clients: int, methods=("flexlora", "she-lora", "maskcrypt", "full-he"), **settings) -> dict:
    from hetune.protocols.she_lora.config import REFERENCES, SheLoraConfig
    from hetune.protocols.she_lora.run import run_federation

    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        for method in methods:
            cfg = SheLoraConfig(out=Path(tmp) / method, method=method, clients=clients, rounds=rounds, alpha=0.3, **settings)
            res = run_federation(cfg, echo=print)
            rows = res["rounds"]
            if method in REFERENCES:
                runs[method] = {"wall_time_s": res["wall_time_s"], "accuracy": [r["accuracy"] for r in rows],
                                "test_loss": [r["test_loss"] for r in rows], "final_accuracy": rows[-1]["accuracy"],
                                "config": res["config"]}
                continue
            runs[method] = {
                "wall_time_s": res["wall_time_s"],
                "accuracy": [r["accuracy"] for r in rows],
                "test_loss": [r["test_loss"] for r in rows],
                "final_accuracy": rows[-1]["accuracy"],
                "bytes_up_per_round": statistics.mean(r["bytes_up"] for r in rows[1:]),
                "bytes_down_per_round": statistics.mean(r["bytes_down"] for r in rows[2:] or rows[1:]),
                "enc_time_s_per_round": statistics.mean(r["enc_time_s"] for r in rows[1:]),
                "agg_time_s_per_round": statistics.mean(r["agg_time_s"] for r in rows[1:]),
                "ciphertexts_up_per_round": statistics.mean(r["ciphertexts_up"] for r in rows[1:]),
                "ciphertexts_down_per_round": statistics.mean(r["ciphertexts_down"] for r in rows[1:]),
                "cipher_columns_down": rows[-1]["cipher_columns_down"],
                "setup_bytes": res["setup_bytes"],
                "config": res["config"],
            }
    return runs


def smollm2(methods: list[str], task: str, rounds: int | None) -> dict:
    """The real run: accuracy of every method; for knowledge also the upload cost on SmolLM2's shapes and the attack."""
    import resource

    import torch

    torch.set_num_threads(1)
    run = dict(SMOLLM2_RUN if task == "knowledge" else SMOLLM2_TEXT_RUN)
    run["rounds"] = rounds or run["rounds"]
    out, plot = smollm2_paths(task)
    result = {"environment": environment(), "run": dict(run), "phases_s": {}}
    if task == "knowledge":  # the cost depends on the shapes only
        t0 = time.perf_counter()
        result["cost"] = upload_cost("smollm2-135m", 2, rank=8, repeats=1)
        result["phases_s"]["cost"] = time.perf_counter() - t0
        print("cost", {k: result["cost"][k] for k in ("she_vs_full-he", "she_vs_full-he-per-column")}, flush=True)
    clients, rounds = run.pop("clients"), run.pop("rounds")
    t0 = time.perf_counter()
    result["accuracy"] = accuracy_runs(rounds, clients, methods, **run)
    result["phases_s"]["accuracy"] = time.perf_counter() - t0
    plot_smollm2(result["accuracy"], plot, task)
    write_json(out, result)  # kept if the attack phase fails
    if task == "knowledge":
        attack_smollm2(result)
    result["max_rss_mb"] = {"benchmark_process": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                            "waited_children": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}
    return result


def attack_smollm2(result: dict) -> dict:
    """DAGER's span check against client 0 at LoRA ranks 8 and 32 (1, 2, 4 documents): token and word recall."""
    import os
    import resource

    from hetune.protocols.she_lora.attack import token_recovery
    from hetune.protocols.she_lora.config import SheLoraConfig

    t0 = time.perf_counter()
    result["attack"] = {}
    for rank in (8, 32):
        cfg = SheLoraConfig(out=Path("unused"), ranks=(rank,), budgets=(4,), **{**SMOLLM2_RUN, "rounds": 1})
        result["attack"][f"rank_{rank}"] = out = token_recovery(cfg, 0, (1, 2, 4))
        for row in out["batches"]:
            print(f"rank {rank}, {row['documents']} docs ({row['distinct_tokens']} tokens, {row['distinct_words']} words): "
                  + "; ".join(f"{what} full/naive/adaptive tokens "
                              + "/".join(f"{row[what][v]:.2f}" for v in ("full", "she_clear_naive", "she_clear_adaptive"))
                              + " words " + "/".join(f"{row['words'][what][v]:.2f}" for v in ("full", "she_clear_naive", "she_clear_adaptive"))
                              for what in ("gradient", "update")), flush=True)
    result.setdefault("phases_s", {})["attack"] = time.perf_counter() - t0
    result["attack"]["load_avg_1m"] = os.getloadavg()[0]
    result["attack"]["max_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return result


def plot_smollm2(runs: dict, path: Path, task: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from hetune.files import save_figure
    from hetune.protocols.she_lora.run import ACCURACY

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for method, run in runs.items():
        axes[0].plot(range(len(run["accuracy"])), run["accuracy"], "-o", label=method)
        axes[1].plot(range(len(run["test_loss"])), run["test_loss"], "-o", label=method)
    axes[0].set_ylabel(ACCURACY[task])
    axes[1].set_ylabel("eval loss")
    for ax in axes:
        ax.set_xlabel("round")
        ax.legend(fontsize=7)
    fig.suptitle(f"SHE-LoRA and references on SmolLM2-135M, {task} task")
    fig.tight_layout()
    save_figure(fig, path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cost-only", action="store_true")
    parser.add_argument("--rounds", type=int, default=None, help="toy: 8; --smollm2: the run's own (3)")
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--smollm2", action="store_true", help="the real model (SmolLM2-135M)")
    parser.add_argument("--task", choices=("knowledge", "text"), default="knowledge", help="--smollm2: the federated task")
    parser.add_argument("--methods", default=ALL_METHODS, help="--smollm2: which methods to run")
    parser.add_argument("--part", choices=("all", "attack"), default="all",
                        help="--smollm2: attack = only the token-recovery attack, written into the existing JSON")
    args = parser.parse_args()
    if args.smollm2 and args.part == "attack":
        import json

        import torch

        torch.set_num_threads(1)
        result = json.loads(OUT_SMOLLM2.read_text()) if OUT_SMOLLM2.exists() else {"environment": environment()}
        write_json(OUT_SMOLLM2, attack_smollm2(result))
        print(f"wrote the attack into {OUT_SMOLLM2}")
        return
    if args.smollm2:
        started = time.perf_counter()
        result = smollm2(args.methods.split(","), args.task, args.rounds)
        result["wall_time_s"] = time.perf_counter() - started
        out, plot = smollm2_paths(args.task)
        write_json(out, result)
        print(f"wrote {out} and {plot}")
        return
    result = {"environment": environment(), "cost": [upload_cost("tiny-llama", 1), upload_cost("llama-3.2-1b-shape", 5)]}
    for c in result["cost"]:
        print(c["model_shapes"], {k: c[k] for k in ("she_vs_full-he", "she_vs_full-he-per-column")})
    if not args.cost_only:
        result["accuracy"] = accuracy_runs(args.rounds or 8, args.clients)
    write_json(OUT, result)
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
