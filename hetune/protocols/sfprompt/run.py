"""``hetune federate sfprompt``: one method, K clients, R rounds; metrics.json + metrics.png.

The harness starts the body server (split methods), runs the Flower apps on the
simulation engine, and measures accuracy on held-out data after every round with the
aggregated prompts and tail (a measurement, not protocol traffic: it is not counted).
"""

from __future__ import annotations

import secrets
import time
from pathlib import Path

import torch

from hetune.errors import ConfigError
from hetune.files import save_figure, write_json
from hetune.protocols.sfprompt import accounting
from hetune.protocols.sfprompt.config import SPLIT_METHODS, SfpromptConfig


def _evaluator(cfg: SfpromptConfig, task):
    from hetune.protocols.sfprompt.client import evaluate_task
    from hetune.protocols.sfprompt.split import split_for

    model = split_for(cfg, task)

    def run(state: dict[str, torch.Tensor]) -> tuple[float, float]:
        model.load_shared(state)
        return evaluate_task(model, task)

    return model, run


def run_local_only(cfg: SfpromptConfig, task) -> list[dict]:
    """Every client trains prompts + tail on its own data; no aggregation, no traffic.
    Accuracy per round: the clients' mean on the held-out data."""
    from hetune.protocols.sfprompt.client import client_round, evaluate_task, round_seed
    from hetune.protocols.sfprompt.data import client_partitions
    from hetune.protocols.sfprompt.split import split_for

    parts = client_partitions(task, cfg.clients, cfg.alpha, cfg.seed)
    models = [split_for(cfg, task) for _ in parts]
    rows, t0 = [], time.perf_counter()
    for r in range(cfg.rounds + 1):
        reports = [] if r == 0 else [
            client_round(m, cfg, task.train.subset(p), task, seed=round_seed(cfg.seed, r, pid))
            for pid, (m, p) in enumerate(zip(models, parts))
        ]
        scores = [evaluate_task(m, task) for m in models]
        rows.append({
            "round": r, "clients_ok": len(reports), "dropped": [], "bytes": {},
            "accuracy": sum(a for a, _ in scores) / len(scores), "loss": sum(lo for _, lo in scores) / len(scores),
            "client_accuracies": [a for a, _ in scores],
            "client_flops_mean": sum(rep.flops for rep in reports) / len(reports) if reports else 0.0,
            "wall_s": round(time.perf_counter() - t0, 3),
        })
    return rows


def run_federated(cfg: SfpromptConfig, task) -> tuple[list[dict], dict]:
    """Flower rounds for ``cfg.method``; returns the per-round rows and the body server's byte totals."""
    from hetune.protocols.flower_sim import run_flower_simulation
    from hetune.protocols.sfprompt.body_server import BodyService, LoopbackBodyServer
    from hetune.protocols.sfprompt.federation import make_client_app, make_server_app, make_strategy
    from hetune.protocols.sfprompt.split import body_stack

    model, evaluate = _evaluator(cfg, task)
    initial = model.shared_state(cfg.trained)
    strategy = make_strategy(cfg, initial)
    server = None
    if cfg.method in SPLIT_METHODS:
        token = secrets.token_urlsafe(32)  # admission to the body server, given to the clients only
        hidden = model.embeddings.patch_embeddings.projection.out_channels if model.family == "vit" else model.embeddings.embedding_dim
        server = LoopbackBodyServer(BodyService(body_stack(cfg.model, cfg.seed, cfg.cut, blocks=cfg.blocks), hidden, token))
    try:
        client_app = make_client_app(cfg.to_dict(), server.url if server else None, token if server else None)
        run_flower_simulation(make_server_app(cfg, strategy, initial, evaluate), client_app, cfg.clients, cfg.client_cpus)
    finally:
        if server:
            server.stop()
    return strategy.rows, (server.service.total_bytes() if server else {"in": 0, "out": 0})


def plot_metrics(rows: list[dict], path: Path, title: str, metric: str = "accuracy") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    ax1.plot([r["round"] for r in rows], [r["accuracy"] for r in rows], "-o")
    ax1.set_xlabel("round")
    ax1.set_ylabel(metric)
    total = 0
    cumulative = []
    for r in rows:
        total += sum(r["bytes"].values())
        cumulative.append(total / 1e6)
    ax2.plot([r["round"] for r in rows], cumulative, "-o")
    ax2.set_xlabel("round")
    ax2.set_ylabel("cumulative traffic (MB)")
    fig.suptitle(title)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)


def run(cfg: SfpromptConfig) -> dict:
    """Run ``cfg.method`` end to end; writes cfg.out/metrics.json and metrics.png if ``out`` is set."""
    from hetune.protocols.sfprompt.client import client_costs
    from hetune.protocols.sfprompt.data import load_task

    if cfg.out is not None:
        if cfg.out.exists() and not cfg.out.is_dir():
            raise ConfigError(f"out={cfg.out} exists and is not a directory", "pass a directory path for --out")
        cfg.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    task = load_task(cfg)
    if cfg.method == "local-only":
        rows, server_bytes = run_local_only(cfg, task), {"in": 0, "out": 0}
    else:
        rows, server_bytes = run_federated(cfg, task)
    totals: dict[str, int] = {}
    for row in rows:
        for kind, n in row["bytes"].items():
            totals[kind] = totals.get(kind, 0) + n
    params = accounting.param_counts(cfg.model, cfg.cut, cfg.n_prompts, blocks=cfg.blocks, lm=task.lm, lora_rank=cfg.lora_rank)
    summary = {
        "config": cfg.to_dict(),
        "final_accuracy": rows[-1]["accuracy"],
        "best_accuracy": max(r["accuracy"] for r in rows),
        "bytes_total": totals,
        "body_server_bytes": server_bytes,  # counted by the server itself, for cross-checking
        "client_flops_per_round_mean": sum(r["client_flops_mean"] for r in rows[1:]) / max(1, len(rows) - 1),
        "params": params,
        "seq_positions": client_costs(cfg, task).positions,
        "accuracy_metric": ("held-out exact match" if task.held_out else "next-token accuracy") if task.lm else "accuracy",
        "wall_s": round(time.perf_counter() - start, 2),
        "rounds": rows,
    }
    if cfg.out is not None:
        plot_metrics(rows, cfg.out / "metrics.png", f"{cfg.method} on {cfg.model}/{cfg.task}, {cfg.clients} clients",
                     summary["accuracy_metric"])
        write_json(cfg.out / "metrics.json", summary)
    return summary
