"""The federated tasks: a real causal LM on non-IID text, or the digits toy.

``knowledge`` and ``text`` (:func:`hetune.data.federated.make_federated_text`): the
loaded model (e.g. SmolLM2-135M) with LoRA on the target linears, trained on its own
next-token loss; the global model is scored by held-out exact match (knowledge) or
next-token accuracy (text) and by the eval loss on held-out documents.

``digits``: scikit-learn's ``load_digits`` (1,797 real 8x8 scans, 10 classes, offline) gives labels
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
class LocalData:
    """One client's view: training set, and the common held-out set the global model is scored on.

    digits: x (N, 65) token ids, y (N,) labels. Causal LM: x (N, L) token ids, y the same
    ids with -100 where a document has ended (no loss there); ``problems`` are the
    held-out questions for exact match (knowledge).
    """

    x: np.ndarray
    y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    problems: tuple = ()

    @property
    def n_samples(self) -> int:
        return len(self.x)


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
        body = frozen_lm(model, seed)[0].model
    body.requires_grad_(False)
    return body.eval()


def bos_id(model: str) -> int:
    from hetune.models.loading import load_config

    cfg = load_config(model)
    if cfg.vocab_size < 18:
        raise ConfigError(f"model {model} has {cfg.vocab_size} tokens, fewer than the 18 the digits task needs", "use a Llama-class model")
    return int(cfg.bos_token_id if cfg.bos_token_id is not None else 17)


def _wrap(body, model: str, targets: tuple[str, ...], rank: int) -> dict:
    """Put a LoraLinear around every target linear of ``body``; {layer name: LoraLinear}."""
    import torch

    LoraLinear = _lora_module()
    loras = {}
    for name, module in list(body.named_modules()):
        for child_name, child in list(module.named_children()):
            if child_name in targets and isinstance(child, torch.nn.Linear):
                lora = LoraLinear(child, rank)
                setattr(module, child_name, lora)
                loras[f"{name}.{child_name}"] = lora
    if not loras:
        raise ConfigError(f"no linear named {', '.join(targets)} in {model}", "use targets such as q_proj,v_proj")
    return loras


@lru_cache(maxsize=2)
def frozen_lm(model: str, seed: int):
    """(causal LM, tokenizer), frozen, loaded once per process (a built-in is built from ``seed``)."""
    from hetune.models.loading import load_model

    loaded = load_model(model, seed=seed)
    loaded.model.requires_grad_(False)
    return loaded.model.eval(), loaded.tokenizer


def build_model(cfg, rank: int):
    """(model, {layer name: LoraLinear}) for ``cfg.task``; layer names are the body's, as in ``layer_shapes``."""
    if not cfg.causal_lm:
        return build_classifier(cfg.model, cfg.seed, cfg.targets, rank)
    lm = copy.deepcopy(frozen_lm(cfg.model, cfg.seed)[0])
    return lm, _wrap(lm.model, cfg.model, cfg.targets, rank)


def build_classifier(model: str, seed: int, targets: tuple[str, ...], rank: int):
    """(classifier, {layer name: LoraLinear}) with fresh zero LoRA factors and a zero head."""
    import torch

    body = copy.deepcopy(_frozen_body(model, seed))
    loras = _wrap(body, model, targets, rank)

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


def lm_loss(lm, x, y, reduction: str = "mean"):
    """Next-token cross-entropy of a causal LM on ids ``x`` with targets ``y`` (-100: no loss)."""
    import torch

    logits = lm(input_ids=x).logits[:, :-1]
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y[:, 1:].reshape(-1),
                                             ignore_index=-100, reduction=reduction)


def _loss(cfg, model, x, y):
    import torch

    return lm_loss(model, x, y) if cfg.causal_lm else torch.nn.functional.cross_entropy(model(x), y)


def train_local(cfg, model, data: LocalData, seed: int, steps: int | None = None) -> float:
    """AdamW on LoRA (and the digits head); returns the mean training loss over the steps."""
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    x, y = torch.as_tensor(data.x), torch.as_tensor(data.y)
    model.train()
    losses = []
    for _ in range(cfg.local_steps if steps is None else steps):
        pick = torch.randint(0, len(y), (min(cfg.batch_size, len(y)),), generator=gen)
        loss = _loss(cfg, model, x[pick], y[pick])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return float(np.mean(losses))


def evaluate(cfg, model, data: LocalData) -> tuple[float, float]:
    """(accuracy, eval loss) of ``model`` on the common held-out set.

    digits: classification accuracy and cross-entropy. knowledge: exact match of the
    greedy answer to the held-out questions; text: next-token accuracy. Loss: mean
    next-token cross-entropy over the held-out documents' tokens.
    """
    if not cfg.causal_lm:
        return _evaluate_digits(model, data.test_x, data.test_y)
    import torch

    from hetune.data.arithmetic import exact_match

    model.eval()
    x, y = torch.as_tensor(data.test_x), torch.as_tensor(data.test_y)
    with torch.no_grad():
        logits = model(input_ids=x).logits[:, :-1]
        target = y[:, 1:]
        keep = target != -100
        loss = torch.nn.functional.cross_entropy(logits[keep], target[keep]).item()
        token_acc = (logits.argmax(-1)[keep] == target[keep]).float().mean().item()
    if cfg.task == "knowledge":
        return exact_match(model, frozen_lm(cfg.model, cfg.seed)[1], list(data.problems)), loss
    return token_acc, loss


def _evaluate_digits(clf, ids: np.ndarray, labels: np.ndarray, batch_size: int = 256) -> tuple[float, float]:
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


def input_norms(model, loras: dict, ids: np.ndarray) -> dict[str, np.ndarray]:
    """||X_:,j||_2 over all calibration tokens, per LoRA layer (n,)."""
    import torch

    for lora in loras.values():
        lora.sq_norm = torch.zeros(lora.A.shape[1])
    model.eval()
    with torch.no_grad():
        model(torch.as_tensor(ids))
    norms = {name: lora.sq_norm.sqrt().numpy().astype(np.float64) for name, lora in loras.items()}
    for lora in loras.values():
        lora.sq_norm = None
    return norms


def local_data(cfg, client: int) -> LocalData:
    """Client ``client``'s training set and the common held-out set, for ``cfg.task``."""
    if not cfg.causal_lm:
        data = load_task(cfg.seed, cfg.test_fraction, cfg.max_samples, bos_id(cfg.model))
        idx = client_indices(data, cfg.clients, cfg.alpha, cfg.seed)[client]
        return LocalData(data.train_ids[idx], data.train_y[idx], data.test_ids, data.test_y)
    texts = _texts(cfg.task, cfg.clients, cfg.seed, cfg.max_docs)
    tok = frozen_lm(cfg.model, cfg.seed)[1]
    x, y = token_blocks(tok, texts.clients[client], cfg.seq_len)
    test_x, test_y = token_blocks(tok, texts.eval_sample(cfg.eval_docs, cfg.seed), cfg.seq_len)
    return LocalData(x, y, test_x, test_y, tuple(texts.held_out))


def all_data(cfg) -> LocalData:
    """Every client's training documents in one set (the centralized reference)."""
    parts = [local_data(cfg, c) for c in range(cfg.clients)]
    width = max(p.x.shape[1] for p in parts)  # causal-LM blocks: pad to the widest client's (digits: all 65)

    def cat(key, fill):
        return np.concatenate([np.pad(getattr(p, key), ((0, 0), (0, width - p.x.shape[1])), constant_values=fill)
                               if p.x.ndim == 2 and getattr(p, key).ndim == 2 else getattr(p, key) for p in parts])

    return LocalData(cat("x", 0), cat("y", -100), parts[0].test_x, parts[0].test_y, parts[0].problems)


@lru_cache(maxsize=4)
def _texts(task: str, clients: int, seed: int, max_docs: int):
    from hetune.data.federated import make_federated_text

    return make_federated_text(task, clients, seed, max_docs)


def token_blocks(tokenizer, docs: list[str], seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Documents -> (ids, targets), both (len(docs), L) with L the longest (at most ``seq_len``) document.

    Padded with 0 at the end; targets are the ids, unshifted (``lm_loss`` shifts), -100 at
    the padding (hetune.data.text.pad_documents).
    """
    if not docs:
        raise ConfigError("a client holds no training document", "use fewer clients or max_docs=0")
    from hetune.data.text import pad_documents

    x, y = pad_documents(docs, tokenizer, seq_len, pad=0)
    return x.numpy(), y.numpy()
