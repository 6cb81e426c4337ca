"""Non-IID text for federated clients, generated or shipped offline.

``knowledge``: the fictional company's facts (:mod:`hetune.data.knowledge`), each topic's
training lines held by one client only (topic t by client t mod clients), so every client
knows facts the others lack and only a federation can answer all the held-out phrasings.
``text``: real English prose that Python ships, the docstrings of the standard library,
split by source package (client i holds whole packages: email, http, asyncio, ...); a
tenth of every package's documents is held out for the global model's eval loss.
"""

from __future__ import annotations

import ast
import random
import sysconfig
from dataclasses import dataclass
from pathlib import Path

from hetune.data.arithmetic import Problem
from hetune.errors import ConfigError

TASKS = ("knowledge", "text")


@dataclass(frozen=True)
class FederatedText:
    task: str
    clients: list[list[str]]  # training documents per client
    holdings: list[list[str]]  # per client: the topics (knowledge) or source packages (text) it holds
    eval_texts: list[str]  # held-out documents: the global model's eval loss
    held_out: list[Problem]  # held-out questions: the global model's exact match (empty for ``text``)

    def eval_sample(self, count: int, seed: int) -> list[str]:
        """``count`` held-out documents drawn evenly (all of them, in order, if no more): ``eval_texts``
        runs source by source, so a prefix would score a few clients' sources only."""
        texts = self.eval_texts
        return list(texts) if len(texts) <= count else random.Random(seed).sample(texts, count)


def make_federated_text(task: str, clients: int, seed: int = 0, max_docs: int = 0) -> FederatedText:
    """``max_docs`` > 0 keeps at most that many training documents per client (fast tests)."""
    if task not in TASKS:
        raise ConfigError(f"task={task!r} is not a federated text task", f"use one of {', '.join(TASKS)}")
    if clients < 1:
        raise ConfigError(f"clients={clients} is invalid", "use at least 1 client")
    data = _knowledge(clients, seed) if task == "knowledge" else _text(clients, seed)
    if max_docs:
        data = FederatedText(data.task, [docs[:max_docs] for docs in data.clients], data.holdings, data.eval_texts, data.held_out)
    return data


def _knowledge(clients: int, seed: int) -> FederatedText:
    from hetune.data.knowledge import COMPANY, TOPICS, make_knowledge_task

    if clients > len(TOPICS):
        raise ConfigError(f"task=knowledge has {len(TOPICS)} topics, fewer than {clients} clients",
                          f"use at most {len(TOPICS)} clients, or task=text")
    task = make_knowledge_task(seed)
    topic_of = {p.format(c=COMPANY): t for t, (_, _, phrasings, _) in enumerate(TOPICS) for p in phrasings}
    train: list[list[str]] = [[] for _ in range(clients)]
    for problem in task.train:  # already shuffled
        train[topic_of[problem.question] % clients].append(problem.text)
    holdings = [[TOPICS[t][0] for t in range(c, len(TOPICS), clients)] for c in range(clients)]
    return FederatedText("knowledge", train, holdings, [p.text for p in task.held_out], list(task.held_out))


def stdlib_docstrings() -> dict[str, list[str]]:
    """Source package -> the prose docstrings (at least 200 characters) of its modules, classes and functions."""
    root = Path(sysconfig.get_paths()["stdlib"])
    sources: dict[str, list[str]] = {}
    for pkg in sorted(p for p in root.iterdir() if p.is_dir() and (p / "__init__.py").is_file()):
        if pkg.name in ("test", "idlelib", "lib2to3", "tkinter", "turtledemo", "ensurepip", "site-packages"):
            continue
        docs = []
        for path in sorted(pkg.rglob("*.py")):
            if "test" in path.relative_to(pkg).parts:
                continue
            try:
                tree = ast.parse(path.read_text(encoding="utf-8"))
            except (SyntaxError, UnicodeDecodeError):
                continue
            for node in ast.walk(tree):
                if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                    doc = ast.get_docstring(node)
                    if doc and len(doc) >= 200:
                        docs.append(doc.strip() + "\n")
        if len(docs) >= 10:
            sources[pkg.name] = docs
    return sources


def _text(clients: int, seed: int) -> FederatedText:
    sources = stdlib_docstrings()
    if len(sources) < clients:
        raise ConfigError(f"the standard library has {len(sources)} source packages, fewer than {clients} clients",
                          f"use at most {len(sources)} clients for task=text")
    rng = random.Random(seed)
    names = sorted(sources)
    rng.shuffle(names)
    train: list[list[str]] = [[] for _ in range(clients)]
    holdings: list[list[str]] = [[] for _ in range(clients)]
    eval_texts: list[str] = []
    for i, name in enumerate(names):
        docs = list(sources[name])
        rng.shuffle(docs)
        cut = max(1, len(docs) // 10)
        eval_texts += docs[:cut]
        train[i % clients] += docs[cut:]
        holdings[i % clients].append(name)
    for docs in train:
        rng.shuffle(docs)
    return FederatedText("text", train, [sorted(h) for h in holdings], eval_texts, [])
