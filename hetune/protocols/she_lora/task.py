"""The federated task: handwritten digits read as token sequences by a Llama-class classifier.

scikit-learn's ``load_digits`` (1,797 real 8x8 scans, 10 classes, offline) gives labels
for a Dirichlet split. Each image becomes 65 tokens: ``<s>`` then the 64 pixel
intensities (0..16) as token ids, row by row. The classifier is a frozen Llama body
(built-in config or a loaded model) with LoRA on the target linears, read out at the
last token (as ``LlamaForSequenceClassification`` does) by a small linear head. LoRA
and the head are what clients train; LoRA scaling is 1 (alpha = r), so a layer's
update is exactly B A whatever the client's rank.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from hetune.errors import ConfigError

NUM_CLASSES = 10


@dataclass(frozen=True)
class DigitsTask:
    train_ids: np.ndarray  # (N, 65) int64
    train_y: np.ndarray  # (N,)
    test_ids: np.ndarray
    test_y: np.ndarray


@lru_cache(maxsize=4)
def load_task(seed: int, test_fraction: float, max_samples: int, bos_id: int) -> DigitsTask:
    from sklearn.datasets import load_digits

    digits = load_digits()
    pixels, labels = digits.data.astype(np.int64), digits.target.astype(np.int64)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(labels))
    if max_samples:
        order = order[:max_samples]
    ids = np.concatenate([np.full((len(order), 1), bos_id), pixels[order]], axis=1)
    n_test = max(1, int(round(test_fraction * len(order))))
    return DigitsTask(ids[n_test:], labels[order][n_test:], ids[:n_test], labels[order][:n_test])


def client_indices(task: DigitsTask, clients: int, alpha: float, seed: int) -> list[np.ndarray]:
    from hetune.data.partition import dirichlet_split

    return dirichlet_split(task.train_y, clients, alpha, seed=seed, min_size=2)


def _lora_module():
    import torch

    class LoraLinear(torch.nn.Module):
        """y = W x + B A x with W frozen. A: (r, n), B: (m, r); scaling 1."""

        def __init__(self, base: torch.nn.Linear, rank: int):
            super().__init__()
            self.base = base
            self.A = torch.nn.Parameter(torch.zeros(rank, base.in_features))
            self.B = torch.nn.Parameter(torch.zeros(base.out_features, rank))
            self.sq_norm: torch.Tensor | None = None  # sum over calibration tokens of x_j^2, when recording

        def forward(self, x):
            if self.sq_norm is not None:
                self.sq_norm += x.detach().reshape(-1, x.shape[-1]).pow(2).sum(0)
            return self.base(x) + (x @ self.A.T) @ self.B.T

    return LoraLinear


@lru_cache(maxsize=2)
def _frozen_body(model: str, seed: int):
    """The frozen Llama body (no LM head), built once per process."""
    import torch

    from hetune.models.builtin import BUILTIN_CONFIGS, builtin_config

    if model in BUILTIN_CONFIGS:
        from transformers import LlamaModel

        torch.manual_seed(seed)
        body = LlamaModel(builtin_config(model))
    else:
        from hetune.models.loading import load_model

        body = load_model(model, seed=seed).model.model
    body.requires_grad_(False)
    return body.eval()


def bos_id(model: str) -> int:
    from hetune.models.loading import load_config

    cfg = load_config(model)
    if cfg.vocab_size < 18:
        raise ConfigError(f"model {model} has {cfg.vocab_size} tokens, fewer than the 18 the digits task needs", "use a Llama-class model")
    return int(cfg.bos_token_id if cfg.bos_token_id is not None else 17)


def build_classifier(model: str, seed: int, targets: tuple[str, ...], rank: int):
    """(classifier, {layer name: LoraLinear}) with fresh zero LoRA factors and a zero head."""
    import torch

    LoraLinear = _lora_module()
    body = copy.deepcopy(_frozen_body(model, seed))
    loras = {}
    for name, module in list(body.named_modules()):
        for child_name, child in list(module.named_children()):
            if child_name in targets and isinstance(child, torch.nn.Linear):
                lora = LoraLinear(child, rank)
                setattr(module, child_name, lora)
                loras[f"{name}.{child_name}"] = lora
    if not loras:
        raise ConfigError(f"no linear named {', '.join(targets)} in {model}", "use targets such as q_proj,v_proj")

    class Classifier(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.body = body
            self.head = torch.nn.Linear(body.config.hidden_size, NUM_CLASSES)
            torch.nn.init.zeros_(self.head.weight)
            torch.nn.init.zeros_(self.head.bias)

        def forward(self, ids):
            hidden = self.body(input_ids=ids).last_hidden_state  # (batch, seq, hidden)
            return self.head(hidden[:, -1])  # last token, as LlamaForSequenceClassification

    return Classifier(), loras


def layer_shapes(model: str, seed: int, targets: tuple[str, ...]) -> dict[str, tuple[int, int]]:
    """Layer name -> (m, n) of every LoRA-wrapped linear (out, in)."""
    _, loras = build_classifier(model, seed, targets, 1)
    return {name: (l.base.out_features, l.base.in_features) for name, l in loras.items()}


def set_adapters(loras: dict, factors: dict[str, tuple[np.ndarray, np.ndarray]]) -> None:
    import torch

    with torch.no_grad():
        for name, (b, a) in factors.items():
            loras[name].B.copy_(torch.as_tensor(b, dtype=torch.float32))
            loras[name].A.copy_(torch.as_tensor(a, dtype=torch.float32))


def fresh_adapters(loras: dict, seed: int) -> None:
    """LoRA's usual start: A Kaiming-uniform (as peft), B zero, so B A = 0."""
    import math

    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for lora in loras.values():
            bound = 1.0 / math.sqrt(lora.A.shape[1])
            lora.A.copy_(torch.rand(lora.A.shape, generator=gen) * 2 * bound - bound)
            lora.B.zero_()


def train_local(clf, ids: np.ndarray, labels: np.ndarray, steps: int, batch_size: int, lr: float, seed: int) -> float:
    """AdamW on LoRA and head; returns the mean training loss over the steps."""
    import torch

    params = [p for p in clf.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    x, y = torch.as_tensor(ids), torch.as_tensor(labels)
    clf.train()
    losses = []
    for _ in range(steps):
        pick = torch.randint(0, len(y), (min(batch_size, len(y)),), generator=gen)
        loss = torch.nn.functional.cross_entropy(clf(x[pick]), y[pick])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return float(np.mean(losses))


def evaluate(clf, ids: np.ndarray, labels: np.ndarray, batch_size: int = 256) -> tuple[float, float]:
    """(accuracy, mean cross-entropy) on the given set."""
    import torch

    clf.eval()
    correct, total_loss = 0, 0.0
    with torch.no_grad():
        for start in range(0, len(labels), batch_size):
            x = torch.as_tensor(ids[start : start + batch_size])
            y = torch.as_tensor(labels[start : start + batch_size])
            logits = clf(x)
            correct += int((logits.argmax(-1) == y).sum())
            total_loss += float(torch.nn.functional.cross_entropy(logits, y, reduction="sum"))
    return correct / len(labels), total_loss / len(labels)


def input_norms(clf, loras: dict, ids: np.ndarray) -> dict[str, np.ndarray]:
    """||X_:,j||_2 over all calibration tokens, per LoRA layer (n,)."""
    import torch

    for lora in loras.values():
        lora.sq_norm = torch.zeros(lora.A.shape[1])
    clf.eval()
    with torch.no_grad():
        clf(torch.as_tensor(ids))
    norms = {name: lora.sq_norm.sqrt().numpy().astype(np.float64) for name, lora in loras.items()}
    for lora in loras.values():
        lora.sq_norm = None
    return norms
