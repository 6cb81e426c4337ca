"""One client's work in one round, read top to bottom; no Flower in here.

SFPrompt (spec steps 1-3): local-loss epochs head -> tail, EL2N scores on that local
model, split fine-tuning of prompts + tail on the kept samples through the remote body.
The baselines reuse the same loop: split-fed skips steps 1-2, fed-prompt and
local-only run the body locally, fl-full trains every weight locally.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from hetune.protocols.sfprompt import accounting
from hetune.protocols.sfprompt.body_client import BodyClient, RemoteBody
from hetune.protocols.sfprompt.config import SPLIT_METHODS, SfpromptConfig
from hetune.protocols.sfprompt.data import TEXT_LEN, Dataset
from hetune.protocols.sfprompt.pruning import el2n_scores, prune_top
from hetune.protocols.sfprompt.split import SplitModel


@dataclass
class RoundReport:
    state: dict[str, torch.Tensor]  # what FedAvg averages
    num_examples: int  # local data size: the FedAvg weight
    kept: int  # samples used for split / local fine-tuning
    train_loss: float
    flops: float  # analytic client FLOPs of this round
    bytes: dict[str, int] = field(default_factory=dict)  # split traffic by kind


def train_epochs(logits_fn, data: Dataset, optimizer, epochs: int, batch_size: int, generator: torch.Generator) -> float:
    """Plain minibatch cross-entropy; returns the mean loss of the last epoch."""
    loss_fn = torch.nn.CrossEntropyLoss()
    last = float("nan")
    for _ in range(epochs):
        losses = []
        for idx in torch.randperm(len(data), generator=generator).split(batch_size):
            loss = loss_fn(logits_fn(data.x[idx]), data.y[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        last = float(np.mean(losses)) if losses else last
    return last


@torch.no_grad()
def evaluate(logits_fn, data: Dataset, batch_size: int = 256) -> tuple[float, float]:
    """(accuracy, mean cross-entropy) over ``data``."""
    correct, loss_sum = 0, 0.0
    for start in range(0, len(data), batch_size):
        logits = logits_fn(data.x[start : start + batch_size])
        y = data.y[start : start + batch_size]
        correct += int((logits.argmax(-1) == y).sum())
        loss_sum += float(torch.nn.functional.cross_entropy(logits, y, reduction="sum"))
    return correct / max(1, len(data)), loss_sum / max(1, len(data))


def round_seed(seed: int, rnd: int, partition: int) -> int:
    """One seed per (run, round, client), the same in the federated and the local-only paths."""
    return seed * 100_003 + rnd * 1009 + partition


def client_costs(cfg: SfpromptConfig, num_classes: int) -> accounting.Costs:
    return accounting.costs(cfg.model, cfg.cut, cfg.n_prompts, seq_len=TEXT_LEN, num_classes=num_classes)


def client_round(split: SplitModel, cfg: SfpromptConfig, data: Dataset, num_classes: int, seed: int,
                 link: BodyClient | None = None) -> RoundReport:
    """Train ``split`` in place on ``data`` for one round of ``cfg.method``."""
    generator = torch.Generator().manual_seed(seed)
    params = split.set_trainable(cfg.full)
    optimizer = torch.optim.AdamW(params, lr=cfg.full_lr if cfg.full else cfg.lr, weight_decay=0.0)
    train_set = data
    if cfg.method == "sfprompt":
        # 1. local-loss update: head -> tail, no communication; the tail is the auxiliary head
        split.train()
        if cfg.local_epochs:
            train_epochs(split.local_forward, data, optimizer, cfg.local_epochs, cfg.batch_size, generator)
        # 2. EL2N on the local head+tail model; keep the hardest floor(gamma * n)
        split.eval()
        train_set = data.subset(prune_top(el2n_scores(split.local_forward, data.x, data.y), cfg.gamma))
    split.train()
    if cfg.method in SPLIT_METHODS:
        # 3. split fine-tuning: activations up, body output down, gradient up, input gradient down
        remote = RemoteBody(link)
        loss = train_epochs(lambda x: split(x, body=remote), train_set, optimizer, cfg.epochs, cfg.batch_size, generator)
    else:
        loss = train_epochs(split, train_set, optimizer, cfg.epochs, cfg.batch_size, generator)
    split.eval()
    flops_method = "fed-prompt" if cfg.method == "local-only" else cfg.method
    flops = accounting.round_flops(client_costs(cfg, num_classes), flops_method, len(data), cfg.epochs, cfg.local_epochs, len(train_set))
    return RoundReport(split.shared_state(cfg.full), len(data), len(train_set), loss, flops, dict(link.bytes) if link else {})
