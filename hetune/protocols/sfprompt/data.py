"""Offline tasks: scikit-learn's digits for the ViT, a generated topic task for the Llamas.

Both are classification, so one accuracy metric and one EL2N score fit both; the Llama
answers through a verbalizer (the class is a digit token read at the last position).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
import torch

TOPICS = {
    "animals": ("cat", "dog", "horse", "tiger", "mouse", "eagle", "shark", "wolf", "camel", "otter"),
    "food": ("bread", "apple", "cheese", "pasta", "melon", "rice", "soup", "honey", "plum", "bean"),
    "weather": ("rain", "snow", "storm", "fog", "wind", "sun", "cloud", "hail", "frost", "heat"),
    "tools": ("hammer", "saw", "drill", "wrench", "chisel", "file", "clamp", "axe", "rake", "spade"),
}
FILLER = ("the", "a", "big", "old", "my", "red", "new", "one", "some", "that", "very", "small")
TEXT_LEN = 40  # bytes after left padding; the longest generated text is shorter


@dataclass(frozen=True)
class Dataset:
    x: torch.Tensor  # (N, 1, 8, 8) float pixels, or (N, TEXT_LEN) token ids
    y: torch.Tensor  # (N,) class indices

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


def load_task(model_family: str, seed: int, dtype=torch.float32) -> Task:
    return digits_task(seed, dtype) if model_family == "vit" else topic_task(seed)


def client_partitions(task: Task, num_clients: int, alpha: float, seed: int) -> list[np.ndarray]:
    from hetune.data.partition import dirichlet_split

    return dirichlet_split(task.train.y.numpy(), num_clients, alpha, seed, min_size=2)
