"""The task-level quality figure: the committed question set, answer matching, and scoring a
variant's greedy answers (batched, on a real onnxruntime session of a tiny model)."""

from __future__ import annotations

from pathlib import Path

import pytest
from tokenizers import Tokenizer

from models.build.pipeline.tasks import DEFAULT_TASKS, Task, load_tasks, matches, task_score
from models.runtime.chat import ChatTemplate
from models.runtime.engine.base import GenerationParams
from models.runtime.engine.ort import OrtEngine


def test_the_committed_set_has_at_least_fifty_answerable_questions() -> None:
    tasks = load_tasks(DEFAULT_TASKS)
    assert len(tasks) >= 50
    assert all(t.question.strip() and all(a.strip() for a in t.answers) for t in tasks)
    assert len({t.question for t in tasks}) == len(tasks)


def test_a_row_without_answers_is_refused(tmp_path: Path) -> None:
    bad = tmp_path / "tasks.jsonl"
    bad.write_text('{"question": "2+2?", "answers": ["4"]}\n\n{"question": "Capital?"}\n')
    with pytest.raises(ValueError, match=r"tasks.jsonl:3"):
        load_tasks(bad)


@pytest.mark.parametrize(("answer", "expected", "ok"), [
    ("The capital of France is Paris.", ["Paris"], True),
    ("william shakespeare, of course", ["Shakespeare"], True),  # case-blind when long
    ("Parisian food is good", ["Paris"], False),  # whole words only
    ("2 + 2 = 4.", ["4", "four"], True),
    ("It is 14", ["4"], False),
    ("Water is H2O", ["H2O"], True),
    ("water is h2o", ["H2O"], False),  # a short answer with capitals keeps its case
    ("The answer is New York City", ["New York"], True),
])
def test_an_answer_counts_when_it_contains_an_expected_one(answer: str, expected: list[str],
                                                           ok: bool) -> None:
    assert matches(answer, expected) is ok


def test_task_score_scores_each_answer_against_its_own_task(
        random_llama_builder: tuple[Path, Path]) -> None:
    ckpt, onnx_dir = random_llama_builder
    engine = OrtEngine(onnx_dir / "model.onnx", Tokenizer.from_file(str(ckpt / "tokenizer.json")),
                       256, [0], threads=1)
    template = ChatTemplate.for_directory(ckpt)
    questions = ["What is two plus two?", "Name a colour.", "Say hello.", "Capital of Peru?",
                 "Count to three.", "What is water?"]
    params = GenerationParams(max_new_tokens=16, stop=template.stop_strings)
    said = [engine.generate(template.render([{"role": "user", "content": q}]), params)
            .text.strip() for q in questions]
    words = [s.split() for s in said]
    assert all(words), "the tiny model said nothing to score"
    # the even tasks expect a word the model says to that question, the odd ones a word it
    # does not say to any
    tasks = [Task(q, (w[0],) if i % 2 == 0 else ("zzzunsaid",))
             for i, (q, w) in enumerate(zip(questions, words, strict=True))]
    report = task_score(engine, template, tasks, max_new_tokens=16, batch=4)
    assert report.answers == tuple(said)
    assert (report.correct, report.total) == (3, 6)
    assert report.score == pytest.approx(0.5)
