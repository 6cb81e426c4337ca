"""Flower side: the ClientApp (one client's round), the Strategy (checks, FedAvg by data
size, per-round metrics) and the ServerApp that runs it.

The ClientApp runs in Ray actor processes; it rebuilds the backbone from its config and
seed (identical weights everywhere), keeps it between rounds, and reaches the body
server over loopback HTTP with the URL and admission token it was given. A client
whose body link fails, or whose reply is malformed, is dropped from that round with
one log line; the round completes with the others.
"""

from __future__ import annotations

import logging
import math
import time
from collections import Counter

import torch

from hetune.errors import HetuneError
from hetune.protocols.sfprompt import wire
from hetune.protocols.sfprompt.body_client import BodyClient
from hetune.protocols.sfprompt.config import SPLIT_METHODS, SfpromptConfig

log = logging.getLogger("hetune.sfprompt")
_ACTOR_CACHE: dict = {}  # per Ray actor process: task, partitions and model, built once


def record_bytes(record) -> int:
    """Serialized size of an ArrayRecord: the parameter payload Flower ships."""
    from flwr.common.serde import array_record_to_proto

    return array_record_to_proto(record).ByteSize()


def _client_state(cfg: SfpromptConfig):
    key = repr(sorted(cfg.to_dict().items()))
    if key not in _ACTOR_CACHE:
        from hetune.protocols.sfprompt.data import client_partitions, load_task
        from hetune.protocols.sfprompt.split import split_for

        task = load_task(cfg)
        split = split_for(cfg, task)
        if cfg.method in SPLIT_METHODS:
            split.drop_body()  # the body's weights live on the server only
        _ACTOR_CACHE.clear()
        _ACTOR_CACHE[key] = (task, client_partitions(task, cfg.clients, cfg.alpha, cfg.seed), split)
    return _ACTOR_CACHE[key]


class _DroppingBodyClient(BodyClient):
    """Test hook ("disconnect" fault): after the first exchange the network path dies."""

    def _exchange(self, *args, **kwargs):
        result = super()._exchange(*args, **kwargs)
        import socket

        import httpx

        with socket.socket() as s:  # a port that nobody listens on
            s.bind(("127.0.0.1", 0))
            dead = s.getsockname()[1]
        self.http = httpx.Client(base_url=f"http://127.0.0.1:{dead}/{wire.API_VERSION}", timeout=5.0)
        return result


def make_client_app(cfg_dict: dict, body_url: str | None, access_token: str | None):
    from flwr.app import ArrayRecord, Context, Error, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp

    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        from hetune.protocols.sfprompt.client import client_round, round_seed

        cfg = SfpromptConfig.from_dict(cfg_dict)
        torch.set_num_threads(1)
        pid = int(context.node_config["partition-id"])
        server_round = int(msg.content["config"]["server-round"])
        task, parts, split = _client_state(cfg)
        incoming = msg.content["arrays"]
        split.load_shared(incoming.to_torch_state_dict())
        link = None
        try:
            if cfg.method in SPLIT_METHODS:
                link = (_DroppingBodyClient if cfg.faults.get(pid) == "disconnect" else BodyClient)(body_url, access_token)
                link.open()
            report = client_round(split, cfg, task.train.subset(parts[pid]), task,
                                  seed=round_seed(cfg.seed, server_round, pid), link=link)
        except HetuneError as err:
            return Message(Error(code=1, reason=f"partition {pid}: {err.message}"), reply_to=msg)
        finally:
            if link is not None:
                link.close()
        state = report.state
        if cfg.faults.get(pid) == "malformed":  # test hook: an update of the wrong shape
            name = next(iter(state))
            state = {**state, name: torch.zeros(3, 3, dtype=state[name].dtype)}
        arrays = ArrayRecord(state)
        metrics = MetricRecord({
            "num-examples": report.num_examples, "kept": report.kept, "train-loss": report.train_loss,
            "client-flops": report.flops, "partition-id": pid,
            "model-down-bytes": record_bytes(incoming), "model-up-bytes": record_bytes(arrays),
            **{f"bytes-{k}": v for k, v in report.bytes.items()},
        })
        return Message(RecordDict({"arrays": arrays, "metrics": metrics}), reply_to=msg)

    return app


def _round_metrics(contents: list, sent: dict[int, int]) -> dict:
    """Loss, kept examples, bytes by kind and client FLOPs of one round, from the surviving replies."""
    per_client = [next(iter(c.metric_records.values())) for c in contents]
    traffic = Counter()
    for m in per_client:
        for key, value in m.items():
            if key.startswith("bytes-"):
                traffic[key[6:]] += int(value)
    traffic["model_down"] = sum(sent.values())
    traffic["model_up"] = sum(record_bytes(c["arrays"]) for c in contents)
    flops = [float(m["client-flops"]) for m in per_client]
    examples = sum(int(m["num-examples"]) for m in per_client)
    return {
        "train_loss": sum(float(m["train-loss"]) * int(m["num-examples"]) for m in per_client) / examples if per_client else math.nan,
        "kept": sum(int(m["kept"]) for m in per_client),
        "bytes": dict(traffic), "client_flops_mean": sum(flops) / len(flops) if flops else 0.0,
        "client_reported_model_bytes": {"down": sum(int(m["model-down-bytes"]) for m in per_client),
                                        "up": sum(int(m["model-up-bytes"]) for m in per_client)},
    }


def reply_problem(content, expected: dict[str, tuple[tuple[int, ...], str]]) -> str | None:
    """Why a client's reply cannot be averaged (``expected``: name -> (shape, dtype) of the shared state), or None."""
    if "arrays" not in content.array_records or not content.metric_records:
        return "reply lacks its arrays or metrics"
    metrics = next(iter(content.metric_records.values()))
    n = metrics.get("num-examples")
    if not isinstance(n, int) or n < 1:
        return f"num-examples is {n!r}, not a positive integer"
    arrays = content["arrays"]
    if set(arrays) != set(expected):
        return f"arrays named {sorted(set(arrays) ^ set(expected))[:3]} do not match the model"
    for name, array in arrays.items():
        shape, dtype = expected[name]
        if tuple(array.shape) != shape or array.dtype != dtype:
            return f"{name} is {array.dtype}{list(array.shape)}, expected {dtype}{list(shape)}"
        if not torch.isfinite(torch.from_numpy(array.numpy())).all():
            return f"{name} holds NaN or infinity"
    return None


def _sort_replies(server_round: int, replies, expected) -> tuple[list, list[dict]]:
    """(replies to average, dropped: node and reason for each error or refused reply, logged)."""
    good, dropped = [], []
    for msg in replies:
        node = msg.metadata.src_node_id
        reason = msg.error.reason if msg.has_error() else reply_problem(msg.content, expected)
        if reason and not msg.has_error() and msg.content.metric_records:
            pid = next(iter(msg.content.metric_records.values())).get("partition-id")
            reason = f"partition {pid}: {reason}" if pid is not None else reason
        if reason:
            log.warning("round %d: dropped client node %d: %s", server_round, node, reason)
            dropped.append({"node": node, "reason": reason})
        else:
            good.append(msg)
    return good, dropped


def make_strategy(cfg: SfpromptConfig, expected: dict[str, torch.Tensor]):
    """A FedAvg that checks every reply first and records one metrics row per round."""
    from flwr.serverapp.strategy import FedAvg

    class SfpromptStrategy(FedAvg):
        def __init__(self):
            super().__init__(fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=cfg.clients,
                             min_available_nodes=cfg.clients)
            self.expected = {k: (tuple(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in expected.items()}
            self.rows: list[dict] = []
            self.sent: dict[int, int] = {}
            self._row: dict = {}
            self._t0 = time.perf_counter()

        def configure_train(self, server_round, arrays, config, grid):
            messages = list(super().configure_train(server_round, arrays, config, grid))
            self.sent = {m.metadata.dst_node_id: record_bytes(m.content["arrays"]) for m in messages}
            return messages

        def aggregate_train(self, server_round, replies):
            from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

            good, dropped = _sort_replies(server_round, replies, self.expected)
            # a fixed summation order (by partition) makes the average independent of arrival order
            contents = sorted((m.content for m in good), key=lambda c: next(iter(c.metric_records.values()))["partition-id"])
            self._row = {"round": server_round, "clients_ok": len(good), "dropped": dropped,
                         **_round_metrics(contents, self.sent)}
            if not good:
                log.warning("round %d: no client update survived; the global model is unchanged", server_round)
                return None, None
            return aggregate_arrayrecords(contents, self.weighted_by_key), None

        def record_evaluation(self, server_round: int, accuracy: float, loss: float) -> None:
            row = self._row if server_round else {"round": 0, "clients_ok": 0, "dropped": [], "bytes": {}, "client_flops_mean": 0.0}
            row.update(accuracy=accuracy, loss=loss, wall_s=round(time.perf_counter() - self._t0, 3))
            self.rows.append(row)
            self._row = {}

    return SfpromptStrategy()


def make_server_app(cfg: SfpromptConfig, strategy, initial_state: dict[str, torch.Tensor], evaluate):
    """``evaluate(state) -> (accuracy, loss)``: the harness's measurement on held-out data."""
    from flwr.app import ArrayRecord, Context, MetricRecord
    from flwr.serverapp import Grid, ServerApp

    app = ServerApp()

    def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        accuracy, loss = evaluate(arrays.to_torch_state_dict())
        strategy.record_evaluation(server_round, accuracy, loss)
        log.info("round %d: accuracy %.4f, loss %.4f", server_round, accuracy, loss)
        return MetricRecord({"accuracy": accuracy, "loss": loss})

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        strategy.start(grid=grid, initial_arrays=ArrayRecord(initial_state), num_rounds=cfg.rounds, evaluate_fn=evaluate_fn)

    return app
