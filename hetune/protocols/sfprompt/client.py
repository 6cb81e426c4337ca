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
from hetune.protocols.sfprompt.data import IGNORE, TEXT_LEN, Dataset, Task
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


def cross_entropy(logits: torch.Tensor, y: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Classification ((B, C), (B,)) or causal-LM ((B, L, V), (B, L)) cross-entropy; IGNORE targets skipped."""
    return torch.nn.functional.cross_entropy(logits.flatten(0, -2), y.flatten(), ignore_index=IGNORE, reduction=reduction)


def train_epochs(logits_fn, data: Dataset, optimizer, epochs: int, batch_size: int, generator: torch.Generator) -> float:
    """Plain minibatch cross-entropy (per token for an LM); returns the mean loss of the last epoch."""
    last = float("nan")
    for _ in range(epochs):
        losses = []
        for idx in torch.randperm(len(data), generator=generator).split(batch_size):
            loss = cross_entropy(logits_fn(data.x[idx]), data.y[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        last = float(np.mean(losses)) if losses else last
    return last


class _CausalLM(torch.nn.Module):
    """A SplitModel behind the ``model(input_ids=...).logits`` interface that greedy decoding uses;
    only the last position's logits (all that decoding reads), sparing the vocabulary projection."""

    def __init__(self, split: SplitModel):
        super().__init__()
        self.split = split

    def forward(self, input_ids: torch.Tensor):
        from types import SimpleNamespace

        s = self.split
        h = s.norm(s.tail(s.body(s.head_forward(input_ids))))
        return SimpleNamespace(logits=s.lm_head(h[:, -1:]))


@torch.no_grad()
def evaluate(logits_fn, data: Dataset, batch_size: int = 256, held_out=(), tokenizer=None) -> tuple[float, float]:
    """(accuracy, mean cross-entropy) over ``data``. Classification: accuracy per sample. Causal LM:
    the loss per target token, and the accuracy is the exact match on ``held_out`` questions
    (greedy answer after "A:") when given, else next-token accuracy."""
    correct, loss_sum, count = 0, 0.0, 0
    for start in range(0, len(data), batch_size):
        logits = logits_fn(data.x[start : start + batch_size])
        y = data.y[start : start + batch_size]
        valid = y != IGNORE
        correct += int(((logits.argmax(-1) == y) & valid).sum())
        loss_sum += float(cross_entropy(logits, y, reduction="sum"))
        count += int(valid.sum())
    if held_out:
        from hetune.data.arithmetic import exact_match

        return exact_match(_CausalLM(logits_fn), tokenizer, list(held_out)), loss_sum / max(1, count)
    return correct / max(1, count), loss_sum / max(1, count)


def evaluate_task(split: SplitModel, task) -> tuple[float, float]:
    """The global model's score on the task's held-out data (batches small enough for a vocabulary of logits)."""
    return evaluate(split, task.test, 8 if task.lm else 256, task.held_out, task.tokenizer)


def round_seed(seed: int, rnd: int, partition: int) -> int:
    """One seed per (run, round, client), the same in the federated and the local-only paths."""
    return seed * 100_003 + rnd * 1009 + partition


def client_costs(cfg: SfpromptConfig, task: Task) -> accounting.Costs:
    seq_len = task.train.x.shape[1] if task.lm else TEXT_LEN  # LM: the padded length every sample is run at
    return accounting.costs(cfg.model, cfg.cut, cfg.n_prompts, seq_len=seq_len, num_classes=task.num_classes,
                            blocks=cfg.blocks, lm=task.lm)


def client_round(split: SplitModel, cfg: SfpromptConfig, data: Dataset, task: Task, seed: int,
                 link: BodyClient | None = None) -> RoundReport:
    """Train ``split`` in place on ``data`` (this client's part of ``task``) for one round of ``cfg.method``."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(split.param_groups(cfg.trained, cfg.learning_rates()), weight_decay=0.0)
    train_set = data
    if cfg.method == "sfprompt":
        # 1. local-loss update: head -> tail, no communication; the tail is the auxiliary head
        split.train()
        if cfg.local_epochs:
            train_epochs(split.local_forward, data, optimizer, cfg.local_epochs, cfg.batch_size, generator)
        # 2. EL2N on the local head+tail model; keep the hardest floor(gamma * n)
        split.eval()
        train_set = data.subset(prune_top(el2n_scores(split.local_forward, data.x, data.y, cfg.batch_size), cfg.gamma))
    split.train()
    if cfg.method in SPLIT_METHODS:
        # 3. split fine-tuning: activations up, body output down, gradient up, input gradient down
        remote = RemoteBody(link)
        loss = train_epochs(lambda x: split(x, body=remote), train_set, optimizer, cfg.epochs, cfg.batch_size, generator)
    else:
        loss = train_epochs(split, train_set, optimizer, cfg.epochs, cfg.batch_size, generator)
    split.eval()
    flops_method = "fed-prompt" if cfg.method == "local-only" else cfg.method
    flops = accounting.round_flops(client_costs(cfg, task), flops_method, len(data), cfg.epochs, cfg.local_epochs, len(train_set))
    return RoundReport(split.shared_state(cfg.trained), len(data), len(train_set), loss, flops, dict(link.bytes) if link else {})
