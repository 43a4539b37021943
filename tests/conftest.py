"""Shared fixtures: a tiny real Llama (trained for seconds), its distilled student, its ladder.

Everything is real — tokenizers BPE, transformers training, optimum export, onnxruntime
sessions — only small, so the whole chain runs on two CPU cores in about a minute.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from models.build.pipeline.options import DEFAULT_HELDOUT

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TINY_MODEL = {
    "hidden_size": 64,
    "intermediate_size": 172,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 512,
    "rope_theta": 10000.0,
}
TINY_TRAIN = {
    "seq_len": 64,
    "batch_size": 8,
    "steps": 60,
    "warmup_steps": 5,
    "lr": 5e-3,
    "min_lr": 5e-4,
    "weight_decay": 0.0,
    "grad_clip": 1.0,
    "checkpoint_every": 1000,
}


@pytest.fixture(scope="session", autouse=True)
def decisions_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The build records its races' outcomes here, never in the user's cache."""
    path = tmp_path_factory.mktemp("decisions") / "decisions.json"
    os.environ["GREENROUTE_DECISIONS_FILE"] = str(path)
    return path


def pytest_report_header() -> str:
    """Which instruction sets this run exercised: onnxruntime (and greenroute's kernels) pick
    their code by them, so a result says where it holds."""
    from models.runtime.host import isa_summary

    return f"cpu: {isa_summary()}"


@pytest.fixture(scope="session")
def tiny_texts(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(train, eval) texts for tiny models: the committed held-out file split 2:1 by lines."""
    root = tmp_path_factory.mktemp("texts")
    lines = DEFAULT_HELDOUT.read_text(encoding="utf-8").splitlines(keepends=True)
    cut = 2 * len(lines) // 3
    (root / "train.txt").write_text("".join(lines[:cut]), encoding="utf-8")
    (root / "eval.txt").write_text("".join(lines[cut:]), encoding="utf-8")
    return root / "train.txt", root / "eval.txt"


@pytest.fixture(scope="session")
def tiny_corpus(tiny_texts: tuple[Path, Path]) -> Path:
    return tiny_texts[0]


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory: pytest.TempPathFactory, tiny_corpus: Path) -> Path:
    """A 2-layer Llama checkpoint directory with a 512-token BPE tokenizer."""
    from models.build.train.tokenizer import save_hf_tokenizer, train_tokenizer
    from models.build.train.train import TrainConfig, run

    root = tmp_path_factory.mktemp("tiny")
    out = root / "teacher"
    out.mkdir()
    tokenizer = train_tokenizer(tiny_corpus, 512)
    save_hf_tokenizer(tokenizer, out, TINY_MODEL["max_position_embeddings"])
    cfg = TrainConfig(seed=7, out_dir=out, corpus=tiny_corpus, model=dict(TINY_MODEL),
                      train=dict(TINY_TRAIN), tokenizer_vocab_size=512)
    run(cfg, root / "teacher-ckpt", threads=2, progress=False)
    return out


TINY_STUDENT = {**TINY_MODEL, "hidden_size": 32, "intermediate_size": 86,
                "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1}


@pytest.fixture(scope="session")
def tiny_student(tiny_teacher: Path, tiny_corpus: Path) -> Path:
    """A narrower 1-layer student distilled (KL + CE) from ``tiny_teacher``, random init."""
    from models.build.train.train import TrainConfig, run

    out = tiny_teacher.parent / "student"
    cfg = TrainConfig(seed=7, out_dir=out, corpus=tiny_corpus, model=dict(TINY_STUDENT),
                      train={**TINY_TRAIN, "steps": 40}, teacher=tiny_teacher,
                      distill={"temperature": 2.0, "alpha": 0.7})
    run(cfg, tiny_teacher.parent / "student-ckpt", threads=2, progress=False)
    return out


def genai_builder_python() -> str | None:
    """Python of the onnxruntime-genai builder environment (``make`` creates ``.venv-builder``);
    ``None`` when absent, an error under CI."""
    from models.build.pipeline.export import default_genai_builder

    found = default_genai_builder()
    if found is not None and Path(found).is_file():
        return found
    if os.environ.get("CI"):
        raise RuntimeError(f"the genai builder environment is missing ({found}): run make test")
    return None


def tiny_build_options(teacher: Path, student: Path | None, out: Path, heldout: Path):  # type: ignore[no-untyped-def]
    from models.build.pipeline.build import BuildOptions

    return BuildOptions(model=str(teacher), student=str(student) if student else None, out=out,
                        heldout=heldout, eval_tokens=2048, eval_window=64,
                        calibration_tokens=16, genai_builder=genai_builder_python(),
                        # whether a draft earns the speculative rung is a timing race: the
                        # shared ladder leaves it out so that its variants never depend on one
                        # (tests/models/test_build.py runs the stage on its own)
                        speculative=False,
                        # every tiny build races and records the outcome (test_build.py builds
                        # once from the recorded decision)
                        race=True)


@pytest.fixture(scope="session")
def tiny_ladder(tiny_teacher: Path, tiny_student: Path, tiny_texts: tuple[Path, Path]) -> Path:
    """A full ladder built from the tiny teacher and student through ``build_ladder``."""
    from models.build.pipeline.build import build_ladder

    out = tiny_teacher.parent / "ladder"
    build_ladder(tiny_build_options(tiny_teacher, tiny_student, out, tiny_texts[1]),
                 log=lambda _m: None)
    return out


@pytest.fixture(scope="session")
def random_llama(tiny_teacher: Path) -> tuple[Path, Path]:
    """(checkpoint dir, exported ONNX dir) of an untrained Llama with widely spread weights,
    whose greedy continuations are varied (a 60-step model mostly repeats newlines)."""
    import shutil

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from models.build.pipeline.export import export_decoder

    torch.manual_seed(3)
    root = tiny_teacher.parent / "random"
    cfg = LlamaConfig(vocab_size=512, initializer_range=0.15, tie_word_embeddings=True,
                      bos_token_id=0, eos_token_id=0, **TINY_MODEL)
    LlamaForCausalLM(cfg).save_pretrained(str(root / "ckpt"))
    shutil.copy2(tiny_teacher / "tokenizer.json", root / "ckpt" / "tokenizer.json")
    export_decoder(root / "ckpt", root / "onnx")
    return root / "ckpt", root / "onnx"


@pytest.fixture(scope="session")
def random_llama_builder(random_llama: tuple[Path, Path]) -> tuple[Path, Path]:
    """(checkpoint dir, ONNX dir) of the same untrained Llama through the genai builder."""
    from models.build.pipeline.export import export_with_genai_builder

    builder = genai_builder_python()
    if builder is None:
        pytest.skip("no genai builder environment (make test creates .venv-builder)")
    ckpt = random_llama[0]
    export_with_genai_builder(ckpt, ckpt.parent / "onnx-builder", builder)
    return ckpt, ckpt.parent / "onnx-builder"
