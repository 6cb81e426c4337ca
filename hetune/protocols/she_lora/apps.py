"""Flower apps (Message API): a ServerApp that drives ``SheLoraStrategy`` and a stateless ClientApp.

``build_server_app`` / ``build_client_app`` bind a config for the simulation engine.
``server_app`` / ``client_app`` at module level are the same apps for a real
deployment (SuperLink + SuperNodes): they read the config from the Flower run config
and the context paths from the node config (``secret-ctx`` on SuperNodes) or run
config (``public-ctx`` for the server). See docs/she_lora.md.
"""

from __future__ import annotations

import logging
import time
from functools import lru_cache
from pathlib import Path

from hetune.errors import ConfigError
from hetune.protocols.she_lora.config import SheLoraConfig, parse_ints

log = logging.getLogger("hetune.she_lora")


@lru_cache(maxsize=2)
def _secret_ctx(path: str):
    from hetune.protocols.she_lora.keys import load_secret_context

    return load_secret_context(Path(path))


def _reply(msg, data: bytes, metrics: dict):
    from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict

    return Message(RecordDict({"payload": ConfigRecord({"data": data}), "metrics": MetricRecord(metrics)}), reply_to=msg)


def build_client_app(cfg: SheLoraConfig | None = None, secret_path: str | None = None):
    """ClientApp; with ``cfg=None`` the config comes from the run config (deployment)."""
    from flwr.clientapp import ClientApp

    from hetune.protocols.she_lora import client as she_client

    app = ClientApp()

    def setup(context):
        run_cfg = cfg or config_from_run_config(context.run_config)
        path = secret_path or context.node_config.get("secret-ctx")
        ctx = _secret_ctx(str(path)) if run_cfg.encrypts else None
        return run_cfg, int(context.node_config["partition-id"]), ctx

    @app.query()
    def query(msg, context):
        run_cfg, cid, _ = setup(context)
        return _reply(msg, she_client.register(run_cfg, cid), {})

    @app.train()
    def train(msg, context):
        run_cfg, cid, ctx = setup(context)
        upload, metrics = she_client.train_round(run_cfg, cid, msg.content["payload"]["data"], ctx)
        return _reply(msg, upload, metrics)

    @app.evaluate()
    def evaluate(msg, context):
        run_cfg, cid, ctx = setup(context)
        return _reply(msg, b"", she_client.evaluate_global(run_cfg, cid, msg.content["payload"]["data"], ctx))

    return app


def build_server_app(cfg: SheLoraConfig | None = None, strategy=None, node_timeout_s: float = 600.0):
    """ServerApp; ``strategy`` (a SheLoraStrategy) stays readable after the run in simulation."""
    from flwr.serverapp import ServerApp

    app = ServerApp()

    @app.main()
    def main(grid, context):
        run_cfg = cfg or config_from_run_config(context.run_config)
        # a fresh strategy per run unless the caller passed one to read afterwards (simulation)
        strat = strategy or strategy_for(run_cfg, context.run_config.get("public-ctx"))
        run_rounds(grid, run_cfg, strat, node_timeout_s)
        if cfg is None:  # deployment: report to the Flower log stream (`flwr run --stream`, `flwr log`)
            _report(strat)

    return app


def _report(strategy) -> None:
    """Per-round metrics (no weights, no data) and rejections on Flower's logger."""
    from logging import INFO, WARNING

    from flwr.common.logger import log as flwr_log

    flwr_log(INFO, "SHE-LoRA: %d clients registered", len(strategy.clients))
    for row in strategy.history:
        flwr_log(INFO, "SHE-LoRA round %s: %s", row.get("round"),
                 {k: round(v, 4) if isinstance(v, float) else v for k, v in row.items() if isinstance(v, (int, float))})
    for rej in strategy.rejections:
        flwr_log(WARNING, "SHE-LoRA rejected: %s", rej)


def strategy_for(cfg: SheLoraConfig, public_ctx_path: str | None):
    """A strategy for ``cfg`` whose context is loaded from the public file (refuses a secret one)."""
    from hetune.protocols.she_lora import task
    from hetune.protocols.she_lora.keys import load_public_context
    from hetune.protocols.she_lora.strategy import SheLoraStrategy

    shapes = task.layer_shapes(cfg.model, cfg.seed, cfg.targets)
    head = None if cfg.causal_lm else (task.NUM_CLASSES, task.build_classifier(cfg.model, cfg.seed, cfg.targets, 1)[0].head.in_features)
    ctx = load_public_context(Path(public_ctx_path)) if cfg.encrypts else None
    return SheLoraStrategy(cfg, shapes, head, ctx)


def _send(grid, nodes, message_type: str, rnd: int, data: bytes):
    from flwr.app import ConfigRecord, Message, RecordDict

    msgs = [Message(RecordDict({"payload": ConfigRecord({"data": data})}), dst_node_id=n, message_type=message_type,
                    group_id=str(rnd)) for n in nodes]
    out = []
    for reply in grid.send_and_receive(msgs):
        node = reply.metadata.src_node_id
        if reply.has_error():
            out.append((node, None, {"error": reply.error.reason}))
        else:
            out.append((node, reply.content["payload"]["data"], dict(reply.content["metrics"])))
    return out


def run_rounds(grid, cfg: SheLoraConfig, strategy, node_timeout_s: float = 600.0) -> None:
    """Round 0 registration/negotiation, then ``cfg.rounds`` rounds of train + aggregate, then a final evaluation."""
    start = time.monotonic()
    while len(nodes := sorted(grid.get_node_ids())) < cfg.clients:
        if time.monotonic() - start > node_timeout_s:
            raise TimeoutError(f"only {len(nodes)} of {cfg.clients} SuperNodes connected")
        time.sleep(0.5)
    replies = _send(grid, nodes, "query", 0, b"")
    strategy.register([(node, data, meta.get("error")) for node, data, meta in replies])
    nodes = sorted(strategy.clients)
    for rnd in range(1, cfg.rounds + 1):
        payload = strategy.round_payload(rnd)
        replies = _send(grid, nodes, "train", rnd, payload)
        strategy.record_accuracy(rnd - 1, [m for _, d, m in replies if d is not None])
        row = strategy.aggregate(rnd, replies, bytes_down=len(payload) * len(nodes))
        log.info("round %d: %s", rnd, row)
    replies = _send(grid, nodes, "evaluate", cfg.rounds + 1, strategy.round_payload(cfg.rounds + 1))
    strategy.record_accuracy(cfg.rounds, [m for _, d, m in replies if d is not None])


# Flower run-config keys and their types; a key's field is its name with "-" -> "_".
RUN_CONFIG_TYPES = {"clients": int, "rounds": int, "model": str, "task": str, "method": str, "ranks": tuple, "budgets": tuple,
                    "alpha": float, "seed": int, "local-steps": int, "lr": float, "batch-size": int, "max-samples": int,
                    "seq-len": int, "max-docs": int, "eval-docs": int}


def config_from_run_config(run_config: dict) -> SheLoraConfig:
    """Flower run config (pyproject [tool.flwr.app.config]) -> SheLoraConfig, once at the top of an app.

    Keys left out keep SheLoraConfig's defaults, the same ones the CLI uses.
    """
    kwargs = {}
    for key, kind in RUN_CONFIG_TYPES.items():
        if key in run_config:
            raw = run_config[key]
            try:
                kwargs[key.replace("-", "_")] = parse_ints(key, raw) if kind is tuple else kind(raw)
            except (TypeError, ValueError):
                raise ConfigError(f"run config {key}={raw!r} is not a {kind.__name__}", f"fix {key} in the run config") from None
    return SheLoraConfig(out=Path(str(run_config.get("out", "runs/she-lora"))), **kwargs)


client_app = build_client_app()
server_app = build_server_app()
