"""Offline tasks: the federated text tasks for SmolLM2, scikit-learn's digits for the ViT,
a generated topic task for the random Llamas.

``knowledge`` and ``text`` (hetune.data.federated) are causal-LM tasks: a sample is one
document's tokens (right-padded) with next-token targets (-100 at padding), and the
clients come split by topic / source package. Digits and topics are classification; the
toy Llama answers through a verbalizer (the class is a digit token read at the last position).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
import torch

from hetune.data.text import IGNORE, pad_documents

TOPICS = {
    "animals": ("cat", "dog", "horse", "tiger", "mouse", "eagle", "shark", "wolf", "camel", "otter"),
    "food": ("bread", "apple", "cheese", "pasta", "melon", "rice", "soup", "honey", "plum", "bean"),
    "weather": ("rain", "snow", "storm", "fog", "wind", "sun", "cloud", "hail", "frost", "heat"),
    "tools": ("hammer", "saw", "drill", "wrench", "chisel", "file", "clamp", "axe", "rake", "spade"),
}
FILLER = ("the", "a", "big", "old", "my", "red", "new", "one", "some", "that", "very", "small")
TEXT_LEN = 40  # bytes after left padding; the longest generated text is shorter


EVAL_DOCS = 16  # held-out documents scored for the eval loss (text: a fixed sample, for time)


@dataclass(frozen=True)
class Dataset:
    x: torch.Tensor  # (N, 1, 8, 8) float pixels, or (N, L) token ids
    y: torch.Tensor  # (N,) class indices, or (N, L) next-token ids (IGNORE where none)

    def __len__(self) -> int:
        return len(self.y)

    def subset(self, idx) -> "Dataset":
        idx = torch.as_tensor(np.asarray(idx), dtype=torch.long)
        return Dataset(self.x[idx], self.y[idx])


@dataclass(frozen=True)
class Task:
    train: Dataset
    test: Dataset
    num_classes: int
    label_token_ids: tuple[int, ...] = ()  # Llama verbalizer
    lm: bool = False  # causal-LM task: y holds next-token targets
    partitions: list[np.ndarray] | None = None  # the task's own client split (None: Dirichlet on y)
    held_out: tuple = ()  # knowledge: held-out questions (hetune.data.arithmetic.Problem), scored by exact match
    tokenizer: object = None


def encode(tokenizer, texts: list[str], seq_len: int) -> Dataset:
    """Documents as right-padded token ids (at most ``seq_len``, the tokenizer's pad id) and their next-token targets."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    x, labels = pad_documents(texts, tokenizer, seq_len, pad)
    y = torch.full_like(labels, IGNORE)
    y[:, :-1] = labels[:, 1:]  # position t predicts token t + 1
    return Dataset(x, y)


def text_task(task: str, model: str, clients: int, seed: int, seq_len: int, max_docs: int) -> Task:
    """A federated text task (hetune.data.federated) tokenized for ``model``; partitions follow its clients."""
    from hetune.data.federated import make_federated_text
    from hetune.protocols.sfprompt.models import tokenizer as model_tokenizer

    fed = make_federated_text(task, clients, seed, max_docs)
    tok = model_tokenizer(model)
    docs = [d for client in fed.clients for d in client]
    sizes = np.cumsum([0] + [len(c) for c in fed.clients])
    parts = [np.arange(sizes[i], sizes[i + 1]) for i in range(clients)]
    return Task(encode(tok, docs, seq_len), encode(tok, fed.eval_sample(EVAL_DOCS, seed), seq_len), len(tok), lm=True, partitions=parts,
                held_out=tuple(fed.held_out), tokenizer=tok)


def digits_task(seed: int, dtype=torch.float32) -> Task:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = torch.tensor(digits.images / 16.0 * 2.0 - 1.0, dtype=dtype).unsqueeze(1)  # (N, 1, 8, 8) in [-1, 1]
    y = torch.tensor(digits.target, dtype=torch.long)
    train_idx, test_idx = train_test_split(np.arange(len(y)), test_size=0.25, random_state=seed, stratify=digits.target)
    return Task(Dataset(x, y).subset(train_idx), Dataset(x, y).subset(test_idx), 10)


def _topic_text(rng: random.Random, topic: str) -> str:
    words = rng.sample(TOPICS[topic], 2) + [rng.choice(FILLER), rng.choice(FILLER)]
    rng.shuffle(words)
    return " ".join(words) + " ->"


def topic_task(seed: int, n_train: int = 1200, n_test: int = 400) -> Task:
    """'storm the fog my ->' is weather (class 2): which topic do the content words share?"""
    from hetune.models.builtin import PAD, byte_tokenizer

    tok = byte_tokenizer()
    pad = tok.convert_tokens_to_ids(PAD)
    rng = random.Random(seed)
    names = list(TOPICS)
    ids, labels = [], []
    for _ in range(n_train + n_test):
        label = rng.randrange(len(names))
        tokens = tok(_topic_text(rng, names[label]), add_special_tokens=False)["input_ids"][-TEXT_LEN:]
        ids.append([pad] * (TEXT_LEN - len(tokens)) + tokens)  # left padding: the last position is always "->"
        labels.append(label)
    x, y = torch.tensor(ids, dtype=torch.long), torch.tensor(labels, dtype=torch.long)
    label_tokens = tuple(tok(str(i), add_special_tokens=False)["input_ids"][0] for i in range(len(names)))
    return Task(Dataset(x[:n_train], y[:n_train]), Dataset(x[n_train:], y[n_train:]), len(names), label_tokens)


def load_task(cfg, dtype=torch.float32) -> Task:
    """The task of an SfpromptConfig."""
    if cfg.task == "digits":
        return digits_task(cfg.seed, dtype)
    if cfg.task == "topics":
        return topic_task(cfg.seed)
    return text_task(cfg.task, cfg.model, cfg.clients, cfg.seed, cfg.seq_len, cfg.max_docs)


def client_partitions(task: Task, num_clients: int, alpha: float, seed: int) -> list[np.ndarray]:
    from hetune.data.partition import dirichlet_split

    if task.partitions is not None:
        return task.partitions
    return dirichlet_split(task.train.y.numpy(), num_clients, alpha, seed, min_size=2)
