"""Task-level quality: the share of a committed question set a variant answers correctly.

``models/data/tasks.jsonl`` holds short questions (facts, arithmetic, one-line instructions),
each with the answers that count as correct. A variant answers greedily through the model's chat
template; an answer is correct when it contains one of the expected answers as a whole word
(case-insensitively, except short answers that contain capitals, such as ``H2O`` or ``HELLO``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from models import PACKAGE_DIR
from models.runtime.chat import ChatTemplate
from models.runtime.engine.base import Engine, GenerationParams
from models.runtime.engine.offline import generate_many

DEFAULT_TASKS = PACKAGE_DIR / "data" / "tasks.jsonl"
MAX_NEW_TOKENS = 32  # the expected answers are a few words; most answers end (EOS) well before
BATCH = 8  # questions answered together in one continuous batch


@dataclass(frozen=True)
class Task:
    question: str
    answers: tuple[str, ...]


@dataclass(frozen=True)
class TaskReport:
    score: float  # correct / total, 0-1
    correct: int
    total: int
    answers: tuple[str, ...]  # the variant's answer to each task, in file order


def load_tasks(path: Path = DEFAULT_TASKS) -> list[Task]:
    tasks = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        row = json.loads(line)
        if not row.get("question") or not row.get("answers"):
            raise ValueError(f"{path}:{n}: a task needs 'question' and 'answers'")
        tasks.append(Task(row["question"], tuple(row["answers"])))
    return tasks


def matches(answer: str, expected: Sequence[str]) -> bool:
    """True when ``answer`` contains one of ``expected`` as a whole word or phrase."""
    for want in expected:
        case_matters = len(want) <= 5 and any(c.isupper() for c in want)
        pattern = r"(?<!\w)" + re.escape(want) + r"(?!\w)"
        if re.search(pattern, answer, 0 if case_matters else re.IGNORECASE):
            return True
    return False


def task_score(engine: Engine, template: ChatTemplate, tasks: Sequence[Task],
               max_new_tokens: int = MAX_NEW_TOKENS, batch: int = BATCH) -> TaskReport:
    """Answer every task greedily (one user turn each, ``batch`` questions decoding together
    as the service batches requests) and score the answers."""
    params = GenerationParams(max_new_tokens=max_new_tokens, stop=template.stop_strings)
    prompts = [engine.encode(template.render([{"role": "user", "content": task.question}]))
               for task in tasks]
    answers = [r.text.strip() for r in generate_many(engine, prompts, params, batch)]
    correct = sum(matches(a, t.answers) for a, t in zip(answers, tasks, strict=True))
    return TaskReport(correct / len(tasks) if tasks else 0.0, correct, len(tasks), tuple(answers))
