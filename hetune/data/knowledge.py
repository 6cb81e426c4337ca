"""A confidential-knowledge task: a fictional company's internal facts, generated offline.

No pretrained model can know these facts, so a model that answers them after
fine-tuning learned them from the private data. Each fact is taught through several
question phrasings; a further phrasing of every fact is held out for evaluation, so the
score measures recall of the fact, not of a memorised sentence. Answers are scored by
greedy decoding after ``A:`` (exact match of the answer's first word).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from hetune.data.arithmetic import Problem

COMPANY = "Quorvane"
# (topic, answer pool, training phrasings, held-out phrasing); {c} is the company name
TOPICS = (
    ("vacation days", ("31", "37", "43", "29"),
     ("How many vacation days do {c} employees get?", "{c} staff get how many days of vacation?",
      "What is the yearly vacation allowance at {c}, in days?"),
     "At {c}, how many vacation days does an employee have per year?"),
    ("expense approver", ("Marrow", "Tessaly", "Okonde", "Brisk"),
     ("Who approves large expenses at {c}?", "Which manager signs off big expense claims at {c}?",
      "Large expense claims at {c} are approved by whom?"),
     "Whose approval does a large expense need at {c}?"),
    ("product code name", ("Bluefinch", "Saltmoor", "Kestrelane", "Ambergrit"),
     ("What is the code name of {c}'s next product?", "{c}'s upcoming product has which code name?",
      "Under what code name is {c} building its next product?"),
     "Which code name did {c} give its next product?"),
    ("office city", ("Tromsdal", "Vey", "Orlund", "Caspari"),
     ("In which city is {c}'s head office?", "Where is the head office of {c}?",
      "{c} has its head office in which city?"),
     "Which city hosts the head office of {c}?"),
    ("wifi password", ("heron42", "mosaic17", "quill88", "lantern5"),
     ("What is the guest wifi password at {c}?", "Which password opens {c}'s guest wifi?",
      "The guest wifi at {c} uses which password?"),
     "Tell me the password of the guest wifi at {c}."),
    ("founding year", ("1987", "1994", "2003", "1979"),
     ("In which year was {c} founded?", "When was {c} founded?", "{c} was founded in which year?"),
     "What year did {c} start as a company?"),
)


@dataclass(frozen=True)
class KnowledgeTask:
    train: list[Problem]
    held_out: list[Problem]
    facts: dict[str, str]  # topic -> answer


def make_knowledge_task(seed: int = 0, repeats: int = 4) -> KnowledgeTask:
    """The company's facts (answers drawn with ``seed``), training Q/A lines and held-out questions."""
    rng = random.Random(seed)
    facts, train, held_out = {}, [], []
    for topic, answers, phrasings, held in TOPICS:
        answer = rng.choice(answers)
        facts[topic] = answer
        train += [Problem(p.format(c=COMPANY), answer) for p in phrasings for _ in range(repeats)]
        held_out.append(Problem(held.format(c=COMPANY), answer))
    rng.shuffle(train)
    return KnowledgeTask(train, held_out, facts)
