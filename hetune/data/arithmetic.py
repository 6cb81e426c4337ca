"""Arithmetic word problems: a fine-tuning task with an exact-match metric, generated offline.

Each problem is one line of text, ``Q: <story> A: <number>``; the model is scored by
greedy-decoding the answer after ``A:`` and comparing it with the true number.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

NAMES = ("Ada", "Ben", "Cleo", "Dan", "Eve", "Finn", "Gus", "Hana", "Ivo", "Jun", "Kim", "Leo")
THINGS = ("apples", "books", "coins", "pens", "shells", "stamps", "cards", "marbles")


@dataclass(frozen=True)
class Problem:
    question: str
    answer: int | str

    @property
    def prompt(self) -> str:
        return f"Q: {self.question} A:"

    @property
    def text(self) -> str:
        return f"{self.prompt} {self.answer}\n"


def make_problem(rng: random.Random, max_operand: int = 20) -> Problem:
    name, thing = rng.choice(NAMES), rng.choice(THINGS)
    a, b = rng.randint(1, max_operand), rng.randint(1, max_operand)
    if rng.random() < 0.5:
        return Problem(f"{name} has {a} {thing} and gets {b} more. How many {thing} now?", a + b)
    a, b = max(a, b), min(a, b)
    return Problem(f"{name} has {a} {thing} and gives away {b}. How many {thing} now?", a - b)


def make_problems(n: int, seed: int, max_operand: int = 20) -> list[Problem]:
    rng = random.Random(seed)
    return [make_problem(rng, max_operand) for _ in range(n)]


def write_jsonl(problems: list[Problem], path) -> None:
    import json

    from hetune.files import write_atomic

    write_atomic(path, "".join(json.dumps({"text": p.text}) + "\n" for p in problems))


def greedy_answer(model, tokenizer, prompt: str, max_new_tokens: int = 4) -> str:
    """The first word the model writes after ``prompt``, decoding greedily."""
    import torch

    ids = torch.tensor([tokenizer(prompt, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        for _ in range(max_new_tokens):
            next_id = model(input_ids=ids).logits[0, -1].argmax()
            ids = torch.cat([ids, next_id.view(1, 1)], dim=1)
    words = tokenizer.decode(ids[0, -max_new_tokens:]).strip().split()
    return words[0].rstrip(".,;!?") if words else ""


def exact_match(model, tokenizer, problems: list[Problem], max_new_tokens: int = 4) -> float:
    """Share of problems whose greedy answer (the first word after ``A:``) equals the true answer."""
    was_training = model.training
    model.eval()
    correct = sum(greedy_answer(model, tokenizer, p.prompt, max_new_tokens) == str(p.answer) for p in problems)
    model.train(was_training)
    return correct / max(1, len(problems))
