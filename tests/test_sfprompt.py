"""SFPrompt parts without Flower: split gradients, the body server, pruning, accounting."""

from __future__ import annotations

import math

import httpx
import numpy as np
import pytest
import torch

from hetune.errors import ConfigError, WorkerError
from hetune.protocols.sfprompt import accounting, wire
from hetune.protocols.sfprompt.body_client import BodyClient, RemoteBody
from hetune.protocols.sfprompt.body_server import BodyServeConfig, BodyService, LoopbackBodyServer
from hetune.protocols.sfprompt.config import SfpromptConfig
from hetune.protocols.sfprompt.data import digits_task, topic_task
from hetune.protocols.sfprompt.pruning import el2n_scores, prune_top
from hetune.protocols.sfprompt.split import SplitModel, body_stack

TOKEN = "test-admission-token"


def _server(model: str, cut, dtype=torch.float32, **cfg) -> LoopbackBodyServer:
    body = body_stack(model, 0, cut, dtype)
    hidden = next(body.parameters()).shape[-1]
    return LoopbackBodyServer(BodyService(body, hidden, TOKEN, BodyServeConfig(**cfg)))


def _batch(model: str, n: int):
    if model == "tiny-vit":
        task = digits_task(0, torch.float64)
        return task.train.x[:n], task.train.y[:n], ()
    task = topic_task(0, n_train=n, n_test=1)
    return task.train.x, task.train.y, task.label_token_ids


def test_prompts_and_tail_take_their_own_learning_rates():
    """A pretrained tail block needs fine-tuning's small step, the new prompts a large one: one AdamW, two groups."""
    _, _, labels = _batch("micro-llama", 2)
    split = SplitModel("micro-llama", 0, (0, 1), 3, labels)
    cfg = SfpromptConfig(model="micro-llama", cut=(0, 1), lr=1e-2, tail_lr=1e-4)
    groups = split.param_groups(cfg.trained, cfg.learning_rates())
    rest = [p for n, p in split.named_parameters() if p.requires_grad and n != "prompts"]
    assert [g["lr"] for g in groups] == [1e-2, 1e-4] and groups[0]["params"] == [split.prompts]
    assert rest and [id(p) for p in groups[1]["params"]] == [id(p) for p in rest]
    before = [p.detach().clone() for p in (split.prompts, *rest)]
    optimizer = torch.optim.AdamW(groups, weight_decay=0.0)
    for p in (split.prompts, *rest):
        p.grad = torch.ones_like(p)
    optimizer.step()  # Adam's first step moves every weight by its group's lr (g / |g| = 1)
    steps = [float((p.detach() - b).abs().max()) for p, b in zip((split.prompts, *rest), before)]
    assert steps[0] == pytest.approx(1e-2, rel=1e-4) and all(s == pytest.approx(1e-4, rel=1e-3) for s in steps[1:])
    assert SfpromptConfig(model="micro-llama", cut=(0, 1), method="fl-lora", lora_lr=3e-4).learning_rates() == {"rest": 3e-4}
    assert SfpromptConfig(model="micro-llama", cut=(0, 1), method="fl-full").learning_rates() == {"rest": 1e-3}


@pytest.mark.parametrize("model,cut", [("tiny-vit", (1, 1)), ("micro-llama", (0, 1))])
def test_split_gradients_equal_monolithic_autograd_float64(model, cut):
    # Prepare: the same seeded model twice in float64, one without its body (the client),
    # one whole (the monolithic reference); the body on a real loopback HTTP server.
    x, y, labels = _batch(model, 6)
    client = SplitModel(model, 0, cut, 3, labels, dtype=torch.float64)
    client.drop_body()
    mono = SplitModel(model, 0, cut, 3, labels, dtype=torch.float64)
    client.set_trainable(False)
    mono.set_trainable(False)
    loss_fn = torch.nn.CrossEntropyLoss()
    with _server(model, cut, torch.float64) as server:
        link = BodyClient(server.url, TOKEN)
        link.open()
        # Execute: split forward and backward through HTTP vs plain autograd
        loss_fn(client(x, body=RemoteBody(link)), y).backward()
        loss_fn(mono(x), y).backward()
        server_bytes = server.service.total_bytes()
        link.close()
    # Assert: prompts and every tail weight get the same gradient, and it is not trivially zero
    grads = {n: p.grad for n, p in client.named_parameters() if p.requires_grad}
    ref = {n: p.grad for n, p in mono.named_parameters() if p.requires_grad}
    assert set(grads) == set(ref) and "prompts" in grads and any(n.startswith("tail.") for n in grads)
    for name in grads:
        torch.testing.assert_close(grads[name], ref[name], rtol=1e-10, atol=1e-13, msg=name)
    assert grads["prompts"].abs().sum() > 0
    # bytes accounted by the client equal the bytes the server received and sent
    assert link.bytes["activations_up"] + link.bytes["gradients_up"] == server_bytes["in"]
    assert link.bytes["activations_down"] + link.bytes["gradients_down"] == server_bytes["out"]
    positions = x.shape[1] + 3 if model != "tiny-vit" else 16 + 1 + 3
    assert link.bytes["activations_up"] == len(wire.pack("h", torch.zeros(6, positions, client.prompts.shape[1], dtype=torch.float64)))


def test_body_server_refuses_bad_requests_and_keeps_serving():
    with _server("tiny-vit", (1, 1), max_pending=2) as server:
        base = f"{server.url}/{wire.API_VERSION}"
        assert httpx.post(f"{base}/sessions").status_code == 401
        assert httpx.post(f"{base}/sessions", headers={"authorization": "Bearer wrong"}).status_code == 401
        link = BodyClient(server.url, TOKEN)
        link.open()
        auth = {"authorization": f"Bearer {link._token}"}
        url = f"{base}/sessions/{link.session_id}"
        h = torch.randn(2, 21, 48)
        assert httpx.post(f"{url}/forward", params={"step": 1}, content=b"garbage", headers=auth).status_code == 400
        assert httpx.post(f"{url}/forward", params={"step": 1}, content=wire.pack("h", torch.randn(2, 21, 7)), headers=auth).status_code == 422
        assert httpx.post(f"{url}/forward", params={"step": 1}, content=wire.pack("h", h.double()), headers=auth).status_code == 422
        assert httpx.post(f"{url}/backward", params={"step": 9}, content=wire.pack("g", h), headers=auth).status_code == 409
        assert httpx.post(f"{url}/forward", params={"step": 1}, content=wire.pack("h", h),
                          headers={"authorization": "Bearer nope"}).status_code == 401
        # still serving: the backward of a step differentiates that step's own forward
        local = body_stack("tiny-vit", 0, (1, 1))
        inputs = [torch.randn(2, 21, 48) for _ in range(3)]
        for step, inp in enumerate(inputs, 1):
            torch.testing.assert_close(link.forward(inp, step), local(inp), rtol=1e-5, atol=1e-5)
        grad_out = torch.randn(2, 21, 48)
        leaf = inputs[1].clone().requires_grad_(True)
        (expected,) = torch.autograd.grad(local(leaf), leaf, grad_out)
        torch.testing.assert_close(link.backward(grad_out, 2), expected, rtol=1e-5, atol=1e-5)
        with pytest.raises(WorkerError, match="409"):
            link.backward(grad_out, 1)  # evicted: at most 2 forwards wait for their backward
        with pytest.raises(WorkerError, match="409"):
            link.backward(grad_out, 2)  # already used
        link.close()


def test_pruning_keeps_exactly_floor_gamma_n_hardest():
    rng = np.random.default_rng(0)
    for n, gamma in [(37, 0.3), (10, 0.5), (7, 1.0), (3, 0.2)]:
        scores = rng.random(n)
        kept = prune_top(scores, gamma)
        assert len(kept) == math.floor(gamma * n)
        assert set(kept) == set(np.argsort(scores)[::-1][: math.floor(gamma * n)])
    assert list(prune_top(np.array([1.0, 2.0, 2.0, 0.5]), 0.5)) == [1, 2]


def test_el2n_is_the_distance_of_softmax_to_onehot():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.0, 0.0, 0.0], [-3.0, 4.0, 0.5]])
    y = torch.tensor([0, 2, 0])
    scores = el2n_scores(lambda x: logits[x], torch.arange(3), y, batch_size=2)
    p = torch.softmax(logits.double(), -1)
    expected = [float(torch.linalg.vector_norm(p[i] - torch.eye(3, dtype=torch.float64)[y[i]])) for i in range(3)]
    np.testing.assert_allclose(scores, expected, rtol=1e-12)
    assert scores.argmax() == 2  # confidently wrong is the hardest


def test_config_names_the_bad_field():
    with pytest.raises(ConfigError, match="cut=2:2 does not fit tiny-vit"):
        SfpromptConfig(cut=(2, 2))
    with pytest.raises(ConfigError, match="gamma=0"):
        SfpromptConfig(gamma=0)
    with pytest.raises(ConfigError, match="vit-b16"):
        SfpromptConfig(model="vit-b16")


def test_accounting_real_vit_configs():
    # ViT-B/16 forward is 17.6 GMACs (Dosovitskiy et al.; timm): 35.1 GFLOPs matmuls
    base = accounting.costs("vit-b16", (0, 0), 0)
    forward = base.embed + base.body_linear + base.body_attn + base.tail_linear
    assert 34.5e9 < forward < 35.8e9
    from transformers import ViTForImageClassification

    from hetune.protocols.sfprompt.models import model_config

    with torch.device("meta"):
        hf = ViTForImageClassification(model_config("vit-l16"))
    assert accounting.param_counts("vit-l16", (0, 0), 0)["total"] == sum(p.numel() for p in hf.parameters())
    # embedding + classifier on the client: well under 1% of FL's local compute
    fl = accounting.round_flops(base, "fl-full", 100, 1, 1, 50)
    sf = accounting.round_flops(accounting.costs("vit-b16", (0, 0), 10), "sfprompt", 100, 1, 1, 50)
    assert 0 < sf / fl < 0.01


def test_cli_refuses_a_cut_deeper_than_the_model(run_cli, tmp_path):
    code, _, err = run_cli("federate", "sfprompt", "--cut", "3:1", "--out", tmp_path / "run")
    assert code == 2 and "cut=3:1 does not fit tiny-vit" in err and "--cut" in err
    assert not (tmp_path / "run").exists()
