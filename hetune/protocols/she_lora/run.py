"""``hetune federate she-lora``: keys, strategy, Flower simulation, metrics.json and metrics.png.

The references ``centralized`` (one trainer on every client's data) and ``local-only``
(each client alone) run in this process without Flower, with the same model, rounds,
LoRA start and evaluation, so their curves sit next to the federated methods'.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from hetune.errors import ConfigError
from hetune.files import save_figure, write_json
from hetune.protocols.she_lora.config import REFERENCES, SheLoraConfig


def check_budgets(cfg: SheLoraConfig, shapes: dict[str, tuple[int, int]]) -> None:
    n_min = min(n for _, n in shapes.values())
    if max(cfg.budgets) > n_min:
        raise ConfigError(f"budgets={cfg.budgets}: a client cannot encrypt more than the {n_min} input columns of a layer",
                          f"use budgets <= {n_min} for {cfg.model}")


def run_federation(cfg: SheLoraConfig, echo: Callable[[str], None] = print) -> dict:
    """Run the federation on Flower's simulation engine; write ``out/metrics.json`` and ``out/metrics.png``."""
    from hetune.protocols.flower_sim import run_flower_simulation
    from hetune.protocols.she_lora import task
    from hetune.protocols.she_lora.apps import build_client_app, build_server_app, strategy_for
    from hetune.protocols.she_lora.keys import setup_keys

    shapes = task.layer_shapes(cfg.model, cfg.seed, cfg.targets)  # also refuses a bad model early
    check_budgets(cfg, shapes)
    if cfg.causal_lm:
        task.local_data(cfg, cfg.clients - 1)  # refuses a bad task/clients pair before any work
    cfg.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    if cfg.method in REFERENCES:
        history = run_reference(cfg)
        result = {"config": _jsonable(cfg), "wall_time_s": time.perf_counter() - started,
                  "layers": {name: list(s) for name, s in shapes.items()}, "setup_bytes": 0, "rounds": history}
        return _finish(cfg, result, echo)
    with tempfile.TemporaryDirectory(prefix="she-lora-keys-") as key_dir:  # 0700; removed after the run
        keys = setup_keys(Path(key_dir), cfg.ckks, galois=cfg.method in ("she-lora", "maskcrypt")) if cfg.encrypts else None
        # one-time set-up upload to the server (public key, plus Galois keys for the column methods); not per round
        setup_bytes = keys.public.stat().st_size if keys else 0
        strategy = strategy_for(cfg, str(keys.public) if keys else None)
        run_flower_simulation(
            build_server_app(cfg, strategy), build_client_app(cfg, str(keys.secret) if keys else None),
            num_clients=cfg.clients, cpus_per_client=cfg.cpus_per_client, verbose=cfg.verbose,
        )
    if not strategy.history or "accuracy" not in strategy.history[-1]:
        from hetune.protocols.she_lora.wire import PayloadError

        raise PayloadError("the federation ended without a final evaluation", "rerun with --verbose to see Flower's log")
    result = {
        "config": _jsonable(cfg),
        "wall_time_s": time.perf_counter() - started,
        "layers": {name: list(s) for name, s in shapes.items()},
        "setup_bytes": setup_bytes,
        "subsets": strategy.subsets,
        "clients": [{"node": node, **vars(info)} for node, info in sorted(strategy.clients.items(), key=lambda kv: kv[1].client)],
        "rejections": strategy.rejections,
        "rounds": strategy.history,
    }
    return _finish(cfg, result, echo)


def _finish(cfg: SheLoraConfig, result: dict, echo: Callable[[str], None]) -> dict:
    history = result["rounds"]
    write_json(cfg.out / "metrics.json", result)
    plot_metrics(history, cfg.out / "metrics.png", f"{cfg.method} on {cfg.model}, task {cfg.task}, {cfg.clients} clients")
    first, last = history[0], history[-1]
    echo(f"{cfg.method}: {ACCURACY[cfg.task]} {first['accuracy']:.3f} -> {last['accuracy']:.3f}, eval loss "
         f"{first['test_loss']:.3f} -> {last['test_loss']:.3f} over {cfg.rounds} rounds; "
         f"{sum(r.get('bytes_up', 0) for r in history) / 1e6:.2f} MB up, "
         f"{sum(r.get('bytes_down', 0) for r in history) / 1e6:.2f} MB down")
    return result


# what a round's "accuracy" is, per task
ACCURACY = {"digits": "accuracy", "knowledge": "held-out exact match", "text": "next-token accuracy"}


def run_reference(cfg: SheLoraConfig) -> list[dict]:
    """Per-round rows of ``centralized`` or ``local-only``, scored like the federation's global model.

    centralized: one learner of rank max(ranks) on all clients' documents, clients x
    local_steps steps per round (the federation's samples per round). local-only: each
    client trains its own LoRA on its own data, local_steps per round; the row is the
    clients' data-size-weighted mean score on the common held-out set.
    """
    import numpy as np

    from hetune.protocols.she_lora import task
    from hetune.protocols.she_lora.client import client_seed

    if cfg.method == "centralized":
        learners = [(0, task.all_data(cfg), max(cfg.ranks), cfg.clients * cfg.local_steps)]
    else:
        learners = [(c, task.local_data(cfg, c), cfg.rank_of(c), cfg.local_steps) for c in range(cfg.clients)]
    curves, weights = [], []
    for c, data, rank, steps in learners:
        model, loras = task.build_model(cfg, rank)
        task.fresh_adapters(loras, client_seed(cfg, c, 0))
        curve = [(*task.evaluate(cfg, model, data), None)]
        for rnd in range(1, cfg.rounds + 1):
            loss = task.train_local(cfg, model, data, client_seed(cfg, c, rnd), steps=steps)
            curve.append((*task.evaluate(cfg, model, data), loss))
        curves.append(curve)
        weights.append(data.n_samples)
    rows = []
    for rnd in range(cfg.rounds + 1):
        acc, loss, train = (np.average([c[rnd][i] for c in curves], weights=weights) if rnd or i < 2 else None
                            for i in range(3))
        rows.append({"round": rnd, "accuracy": float(acc), "test_loss": float(loss),
                     "train_loss": None if train is None else float(train),
                     "bytes_up": 0, "bytes_down": 0, "enc_time_s": 0.0, "agg_time_s": 0.0})
    return rows


def _jsonable(cfg: SheLoraConfig) -> dict:
    from dataclasses import asdict

    out = asdict(cfg)
    out["out"] = str(cfg.out)
    return out


def plot_metrics(history: list[dict], path: Path, title: str) -> None:
    """Accuracy, training loss, bytes and times per round, one PNG (written atomically)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    acc = [(r["round"], r["accuracy"]) for r in history if "accuracy" in r]
    axes[0].plot(*zip(*acc), "-o", label="test accuracy")
    loss = [(r["round"], r["train_loss"]) for r in history if r.get("train_loss") is not None]
    if loss:
        axes[0].plot(*zip(*loss), "--s", label="train loss")
    axes[0].set_xlabel("round")
    axes[0].legend(fontsize=8)
    rows = [r for r in history if "bytes_up" in r]
    axes[1].bar([r["round"] - 0.2 for r in rows], [r["bytes_up"] / 1e6 for r in rows], 0.4, label="up")
    axes[1].bar([r["round"] + 0.2 for r in rows], [r["bytes_down"] / 1e6 for r in rows], 0.4, label="down")
    axes[1].set_ylabel("MB per round")
    axes[1].set_xlabel("round")
    axes[1].legend(fontsize=8)
    axes[2].plot([r["round"] for r in rows], [r["enc_time_s"] for r in rows], "-o", label="encryption (all clients)")
    axes[2].plot([r["round"] for r in rows], [r["agg_time_s"] for r in rows], "-s", label="aggregation (server)")
    axes[2].set_ylabel("seconds per round")
    axes[2].set_xlabel("round")
    axes[2].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)
