"""SFPrompt on the real pretrained SmolLM2-135M, truncated to its first blocks for speed.

The weights are SmolLM2's own (hetune.models.loading); ``blocks`` keeps the first few of
its 30 blocks so a round takes seconds on 2 cores. Asserted: what the protocol promises
(what the body server receives, what stays frozen, FedAvg of the prompts, EL2N on token
losses) and that the accounting matches the real model.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hetune.errors import ConfigError
from hetune.protocols.sfprompt.body_client import BodyClient
from hetune.protocols.sfprompt.body_server import BodyService, LoopbackBodyServer
from hetune.protocols.sfprompt.client import client_round, cross_entropy, round_seed
from hetune.protocols.sfprompt.config import SfpromptConfig
from hetune.protocols.sfprompt.data import IGNORE, load_task
from hetune.protocols.sfprompt.pruning import el2n_scores, prune_top
from hetune.protocols.sfprompt.run import run
from hetune.protocols.sfprompt.split import body_stack, split_for

TOKEN = "test-admission-token"
# 2 clients, 4 of SmolLM2's blocks (1 head, 2 body, 1 tail), 4 documents each, 24 tokens
SMALL = dict(model="smollm2-135m", task="knowledge", clients=2, rounds=1, blocks=4, max_docs=4, seq_len=24, batch_size=4)


@pytest.fixture(scope="module")
def small():
    cfg = SfpromptConfig(**SMALL)
    return cfg, load_task(cfg)


class RecordingService(BodyService):
    """The body service, keeping a copy of every tensor a client sends it."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.received: list[tuple[str, torch.Tensor]] = []

    def forward(self, session, step, h, keep):
        self.received.append(("forward", h.detach().clone()))
        return super().forward(session, step, h, keep)

    def backward(self, session, step, grad):
        self.received.append(("backward", grad.clone()))
        return super().backward(session, step, grad)


def _client_round_through_server(cfg, task, pid: int, head_hook=None):
    """One sfprompt round of client ``pid`` against a recording loopback body server."""
    client = split_for(cfg, task)
    client.drop_body()
    if head_hook:
        client.head.register_forward_hook(head_hook)
    service = RecordingService(body_stack(cfg.model, cfg.seed, cfg.cut, blocks=cfg.blocks), 576, TOKEN)
    data = task.train.subset(task.partitions[pid])
    with LoopbackBodyServer(service) as server:
        link = BodyClient(server.url, TOKEN)
        link.open()
        report = client_round(client, cfg, data, task, seed=round_seed(cfg.seed, 1, pid), link=link)
        link.close()
    return client, service, data, report


def test_body_server_receives_only_head_activations_never_tokens_or_embeddings(small):
    cfg, task = small
    head_io = []  # (input, output) of the client's first block, every call

    def record(module, args, output):
        head_io.append((args[0].detach().clone(), output.detach().clone()))

    client, service, data, report = _client_round_through_server(cfg, task, 0, head_hook=record)
    assert report.kept == len(data) // 2 > 0
    forwards = [t for kind, t in service.received if kind == "forward"]
    backwards = [t for kind, t in service.received if kind == "backward"]
    assert len(forwards) == len(backwards) >= 1
    for h in forwards + backwards:  # activations and gradients of one shape, never token ids or labels
        assert h.dtype == torch.float32 and h.shape[1:] == (cfg.prompts + data.x.shape[1], 576)
    # what reached the server is, bit for bit, the output of the client's first block in the
    # split steps (the last calls), and never what entered it (prompts + token embeddings)
    split_calls = head_io[-len(forwards) :]
    embedding = client.embeddings.weight.detach()
    for h, (block_in, block_out) in zip(forwards, split_calls):
        assert torch.equal(h, block_out)
        tokens = h[:, cfg.prompts :].reshape(-1, 576)
        assert torch.cdist(tokens, block_in[:, cfg.prompts :].reshape(-1, 576)).diagonal().min() > 0.5
        assert torch.cdist(tokens, embedding).min() > 0.5  # no position carries a token's embedding row
    # the naive inversion (nearest embedding row by cosine) recovers every token from the embedding
    # output, and almost none from the first block's output that the server gets
    pad = task.tokenizer.eos_token_id
    block_in, block_out = split_calls[0]
    ids = [i for i in range(len(data)) if torch.equal(block_in[0, cfg.prompts :], client.embed(data.x[i : i + 1])[0, cfg.prompts :])]
    assert ids, "the first split batch starts with one of the client's samples"

    def recovery(vectors: torch.Tensor, tokens: torch.Tensor) -> float:
        keep = tokens != pad
        unit = torch.nn.functional.normalize
        guess = (unit(vectors[keep], dim=-1) @ unit(embedding, dim=-1).T).argmax(-1)
        return float((guess == tokens[keep]).float().mean())

    tokens = data.x[ids[0]]
    assert recovery(block_in[0, cfg.prompts :], tokens) == 1.0
    assert recovery(forwards[0][0, cfg.prompts :], tokens) < 0.1


def test_frozen_parts_stay_frozen_and_only_prompts_and_tail_move(small):
    cfg, task = small
    client, service, _, _ = _client_round_through_server(cfg, task, 1)
    fresh = split_for(cfg, task)
    before = dict(fresh.named_parameters())
    moved = {n for n, p in client.named_parameters() if not torch.equal(p, before[n])}
    assert "prompts" in moved and any(n.startswith("tail.") for n in moved)
    assert all(n == "prompts" or n.startswith(("tail.", "norm.")) for n in moved), moved
    # the embedding (tied to the LM head) and the head block are bit for bit the pretrained ones
    assert torch.equal(client.embeddings.weight, fresh.embeddings.weight)
    assert client.lm_head.weight is client.embeddings.weight
    for name, p in client.head.named_parameters():
        assert torch.equal(p, dict(fresh.head.named_parameters())[name]), name
    # the server's body never moved either
    body = body_stack(cfg.model, cfg.seed, cfg.cut, blocks=cfg.blocks)
    for (name, p), q in zip(service.body.named_parameters(), body.parameters()):
        assert torch.equal(p, q) and not p.requires_grad, name


def test_el2n_on_token_losses_is_the_mean_over_target_tokens_and_pruning_keeps_the_highest(small):
    cfg, task = small
    model = split_for(cfg, task)
    data = task.train.subset(task.partitions[0])
    scores = el2n_scores(model.local_forward, data.x, data.y, batch_size=3)
    with torch.no_grad():
        logits = model.local_forward(data.x).double()
    for i in range(len(data)):
        valid = data.y[i] != IGNORE
        p = torch.softmax(logits[i][valid], -1)
        onehot = torch.nn.functional.one_hot(data.y[i][valid], p.shape[-1]).double()
        # float32 logits in batches of 3 vs all at once: the GEMMs round differently per CPU
        assert scores[i] == pytest.approx(float(torch.linalg.vector_norm(p - onehot, dim=-1).mean()), rel=1e-5)
    # padding does not count: the sample alone (its own length) scores the same
    n = int((data.y[0] != IGNORE).sum()) + 1
    alone = el2n_scores(model.local_forward, data.x[:1, :n], data.y[:1, :n])
    assert alone[0] == pytest.approx(scores[0], rel=1e-5)
    kept = prune_top(scores, 0.5)
    assert len(kept) == len(data) // 2 and min(scores[kept]) >= max(np.delete(scores, kept))
    # and the LM loss the client trains on is the per-token cross-entropy over the same positions
    with torch.no_grad():
        loss = cross_entropy(model.local_forward(data.x), data.y)
    valid = data.y != IGNORE
    manual = -torch.log_softmax(logits.float(), -1).gather(-1, data.y.clamp(min=0).unsqueeze(-1)).squeeze(-1)[valid].mean()
    torch.testing.assert_close(loss, manual, rtol=1e-4, atol=1e-4)


def test_federated_prompts_and_tail_are_the_data_weighted_average_of_the_clients(small, monkeypatch):
    from hetune.protocols.sfprompt import federation
    from hetune.protocols.sfprompt import run as run_module

    cfg, task = small
    captured, replies = {}, {}
    make_evaluator, make_strategy = run_module._evaluator, federation.make_strategy

    def capturing(cfg_, task_):
        model, evaluate = make_evaluator(cfg_, task_)

        def run(state):
            captured[len(captured)] = {k: v.clone() for k, v in state.items()}
            return evaluate(state)

        return model, run

    def recording_strategy(cfg_, expected):
        strategy = make_strategy(cfg_, expected)
        aggregate = strategy.aggregate_train

        def aggregate_train(server_round, messages):
            messages = list(messages)
            replies[server_round] = [m.content for m in messages]
            return aggregate(server_round, messages)

        strategy.aggregate_train = aggregate_train
        return strategy

    monkeypatch.setattr(run_module, "_evaluator", capturing)
    monkeypatch.setattr(federation, "make_strategy", recording_strategy)
    summary = run_module.run(cfg)
    assert [r["clients_ok"] for r in summary["rounds"][1:]] == [2]
    global_state = captured[1]
    # the updates the two clients actually sent (the run's clients train in their own
    # processes, whose float rounding a replay here need not match bit for bit)
    metrics = [next(iter(c.metric_records.values())) for c in replies[1]]
    sent = [(c["arrays"].to_torch_state_dict(), m["num-examples"]) for c, m in zip(replies[1], metrics)]
    assert len(sent) == 2 and set(global_state) == set(sent[0][0]) and "prompts" in global_state
    assert sorted(w for _, w in sent) == sorted(len(p) for p in task.partitions[:2])
    for name, value in global_state.items():
        average = sum(w * state[name].double() for state, w in sent) / sum(w for _, w in sent)
        torch.testing.assert_close(value.double(), average, rtol=1e-6, atol=1e-7, msg=name)
    assert not torch.equal(global_state["prompts"], sent[0][0]["prompts"])
    assert not torch.equal(sent[0][0]["prompts"], sent[1][0]["prompts"])
    # and client 0's round replayed here from the same state and seed lands where the run's did
    # (to float rounding, far nearer than to where it started)
    first = next(state["prompts"] for (state, _), m in zip(sent, metrics) if m["partition-id"] == 0)
    replayed = _client_round_through_server(cfg, task, 0)[3].state["prompts"]
    start = split_for(cfg, task).shared_state(cfg.trained)["prompts"]
    assert torch.dist(replayed, first) < 0.01 * torch.dist(start, first)


def test_accounting_matches_the_real_smollm2():
    from hetune.models.loading import load_model
    from hetune.protocols.sfprompt import accounting

    real = load_model("smollm2-135m").model
    counts = accounting.param_counts("smollm2-135m", (1, 1), 4, lm=True)
    assert counts["total"] == sum(p.numel() for p in real.parameters()) == 134_515_008
    block = sum(p.numel() for p in real.model.layers[-1].parameters())
    assert counts["prompts_and_tail"] == 4 * 576 + block + 576  # prompts, last block, final norm; LM head frozen
    c = accounting.costs("smollm2-135m", (0, 0), 0, seq_len=10, lm=True)
    linears = sum(p.numel() for n, p in real.model.layers.named_parameters() if p.dim() == 2)
    assert c.body_linear == 2 * 10 * linears and c.out_head == 2 * 10 * real.lm_head.weight.numel()


def test_lm_tasks_refuse_settings_that_break_them():
    with pytest.raises(ConfigError, match="token embeddings"):
        SfpromptConfig(model="smollm2-135m", task="knowledge", cut=(0, 1))
    with pytest.raises(ConfigError, match="task=digits does not run on smollm2-135m"):
        SfpromptConfig(model="smollm2-135m", task="digits")
    with pytest.raises(ConfigError, match="blocks=31"):
        SfpromptConfig(model="smollm2-135m", blocks=31)
    assert SfpromptConfig(model="smollm2-135m").task == "knowledge"
    assert SfpromptConfig(model="smollm2-135m", method="fl-full").learning_rates() == {"rest": 5e-5}
    assert SfpromptConfig(model="smollm2-135m").learning_rates() == {"prompts": 1e-3, "rest": 1e-3}
    assert SfpromptConfig(model="smollm2-135m").local_epochs == 0 and SfpromptConfig(model="micro-llama", cut=(0, 1)).local_epochs == 1


def test_cli_runs_fl_lora_on_the_text_task(run_cli, tmp_path):
    import json

    out = tmp_path / "run"
    code, stdout, err = run_cli("federate", "sfprompt", "--model", "smollm2-135m", "--task", "text", "--method", "fl-lora",
                                "--blocks", "3", "--clients", "2", "--rounds", "1", "--max-docs", "2", "--seq-len", "16",
                                "--batch-size", "2", "--out", out)
    assert code == 0, err
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["accuracy_metric"] == "next-token accuracy" and metrics["config"]["task"] == "text"
    lora = metrics["params"]["lora"]
    assert metrics["rounds"][1]["bytes"]["model_up"] > 2 * 4 * lora  # two clients' adapters, float32, plus framing
    assert metrics["rounds"][1]["loss"] < metrics["rounds"][0]["loss"]
    assert "next-token accuracy" in stdout


@pytest.mark.slow
def test_benchmark_run_sfprompt_learns_with_less_traffic_and_compute_than_federated_lora_and_fl():
    """The benchmark's setting (benchmarks/sfprompt.py --part smollm2) for sfprompt and fl-lora, the whole 30-block
    model, 2 clients, 2 rounds: about 2 minutes on 2 quiet cores. fl-full (15 GB) is not run: its traffic is
    bounded from below by every weight each way, float32. Seen: sfprompt 5.14 -> 3.22 -> 2.61, fl-lora 5.24 -> 3.13 -> 2.05.

    The paper's accuracy claim ("competitive" with FL) is not asserted: on this task and budget SFPrompt's eval
    loss stays about 0.6 nats above LoRA's (docs/benchmarks.md)."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    from sfprompt import SMOLLM2

    got = {m: run(SfpromptConfig(method=m, **SMOLLM2)) for m in ("sfprompt", "fl-lora")}
    for m, summary in got.items():
        losses = [r["loss"] for r in summary["rounds"]]
        assert losses[2] < losses[1] < losses[0] - 1.0, (m, losses)  # every method learns the facts' lines
        assert [r["clients_ok"] for r in summary["rounds"][1:]] == [2, 2], m
    sf, lora = got["sfprompt"], got["fl-lora"]
    fl_bytes_at_least = 2 * SMOLLM2["clients"] * SMOLLM2["rounds"] * 4 * sf["params"]["total"]
    # the paper: 53% less traffic than FL (ours: 97% less, short lines make activations cheap)
    assert sum(sf["bytes_total"].values()) < 0.47 * fl_bytes_at_least
    # the client computes less than with federated LoRA (and so than FL, which also trains every weight)
    assert sf["client_flops_per_round_mean"] < lora["client_flops_per_round_mean"]


@pytest.mark.slow
def test_benchmark_run_sfprompt_learns_the_stdlib_text():
    """The text benchmark's setting (benchmarks/sfprompt.py --part smollm2 --task text) for sfprompt: about 1 minute.
    At the first defaults (one local-loss epoch, 3e-3) its eval loss rose, 3.75 -> 3.96 -> 4.10; now 3.75 -> 3.60 -> 3.53."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    from sfprompt import SMOLLM2_TASKS

    summary = run(SfpromptConfig(method="sfprompt", **SMOLLM2_TASKS["text"]))
    losses = [r["loss"] for r in summary["rounds"]]
    assert losses[2] < losses[1] < losses[0] - 0.1, losses
    assert [r["clients_ok"] for r in summary["rounds"][1:]] == [2, 2]
