"""Training code: resumable and reproducible; students initialised from teacher layers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from models.build.train.train import TrainConfig, run
from tests.conftest import TINY_MODEL, TINY_TRAIN


def _cfg(out: Path, corpus: Path, tokenizer_dir: Path) -> TrainConfig:
    import shutil

    out.mkdir(parents=True, exist_ok=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy2(tokenizer_dir / name, out / name)
    return TrainConfig(seed=5, out_dir=out, corpus=corpus,
                       model={**TINY_MODEL, "num_hidden_layers": 1},
                       train={**TINY_TRAIN, "steps": 6, "checkpoint_every": 100})


def test_resumed_training_equals_uninterrupted(tmp_path: Path, tiny_corpus: Path,
                                               tiny_teacher: Path) -> None:
    straight = _cfg(tmp_path / "a", tiny_corpus, tiny_teacher)
    run(straight, tmp_path / "ckpt-a", progress=False)
    split = _cfg(tmp_path / "b", tiny_corpus, tiny_teacher)
    partial = run(split, tmp_path / "ckpt-b", progress=False, until=3)
    assert partial == {"out_dir": str(split.out_dir), "steps": 3, "finished": False}
    assert not (split.out_dir / "model.safetensors").exists()
    run(split, tmp_path / "ckpt-b", progress=False)
    a = load_file(str(straight.out_dir / "model.safetensors"))
    b = load_file(str(split.out_dir / "model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])


def test_student_is_initialised_from_evenly_spaced_teacher_layers(tiny_teacher: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from models.build.train.student import student_from_teacher

    teacher = AutoModelForCausalLM.from_pretrained(str(tiny_teacher), dtype=torch.float32)
    student = student_from_teacher(teacher, 1)[0]
    assert student.config.num_hidden_layers == 1
    t, s = teacher.state_dict(), student.state_dict()
    assert torch.equal(s["model.embed_tokens.weight"], t["model.embed_tokens.weight"])
    key = "model.layers.0.mlp.up_proj.weight"
    assert torch.equal(s[key], t[key])
    with pytest.raises(ValueError, match="between 1 and 1"):
        student_from_teacher(teacher, 2)


def test_distillation_pulls_the_student_towards_the_teacher(tiny_teacher: Path,
                                                            tiny_student: Path) -> None:
    """The distilled student's next-token argmax agrees with its teacher's far above chance."""
    import torch
    from transformers import AutoModelForCausalLM

    teacher = AutoModelForCausalLM.from_pretrained(str(tiny_teacher), dtype=torch.float32)
    student = AutoModelForCausalLM.from_pretrained(str(tiny_student), dtype=torch.float32)
    ids = torch.randint(1, 512, (1, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        agree = (teacher(ids).logits.argmax(-1) == student(ids).logits.argmax(-1)).float().mean()
    assert float(agree) > 0.2  # chance is 1/512
