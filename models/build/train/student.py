"""A layer-dropped student of a teacher: which blocks it keeps, how it is made from the teacher,
and how a ladder rebuilds it from the teacher plus the student's own saved blocks (build time
only: torch). Trained by :mod:`models.build.train.distil`."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np

STUDENT_FILE = "student.safetensors"
STUDENT_META = "student.json"
_BLOCK = re.compile(r"\.(layers|h|layer|blocks)\.(\d+)\.")


def layer_picks(total: int, layers: int) -> list[int]:
    """Evenly spaced teacher blocks, first and last included."""
    if not 1 <= layers < total:
        raise ValueError(f"student layers must be between 1 and {total - 1}, got {layers}")
    return [round(i * (total - 1) / max(1, layers - 1)) for i in range(layers)]


def student_key(teacher_key: str, picks: list[int]) -> str | None:
    """The student's name for a teacher tensor: a block's tensor is renumbered to the block's
    place among ``picks`` (``None`` when the block is dropped); others keep their name."""
    m = _BLOCK.search(teacher_key)
    if m is None:
        return teacher_key
    block = int(m.group(2))
    if block not in picks:
        return None
    return (teacher_key[: m.start()] + f".{m.group(1)}.{picks.index(block)}."
            + teacher_key[m.end():])


def _layers_attr(cfg: Any) -> str:
    return next(a for a in ("num_hidden_layers", "n_layer", "num_layers") if hasattr(cfg, a))


def student_from_teacher(teacher: Any, layers: int) -> tuple[Any, list[int]]:
    """A ``layers``-block copy of ``teacher``'s architecture initialised from evenly spaced
    blocks."""
    picks = layer_picks(int(getattr(teacher.config, _layers_attr(teacher.config))), layers)
    return student_from_picks(teacher, picks), picks


def student_from_picks(teacher: Any, picks: list[int]) -> Any:
    """A copy of ``teacher``'s architecture made of its blocks ``picks``, in that order."""
    import copy

    from transformers import AutoModelForCausalLM

    cfg = copy.deepcopy(teacher.config)
    attr = _layers_attr(cfg)
    setattr(cfg, attr, len(picks))
    if isinstance(getattr(cfg, "layer_types", None), list):  # per-block kinds (Gemma, Qwen):
        cfg.layer_types = [cfg.layer_types[i] for i in picks]  # each kept block keeps its own
    student = AutoModelForCausalLM.from_config(cfg)
    t_state = teacher.state_dict()
    new_state = {}
    for key in student.state_dict():
        m = _BLOCK.search(key)
        src = key if m is None else (
            key[: m.start()] + f".{m.group(1)}.{picks[int(m.group(2))]}." + key[m.end():])
        new_state[key] = t_state[src].detach().clone()
    student.load_state_dict(new_state)
    return student.to(next(teacher.parameters()).dtype)


def load_candidate(teacher: Any, cdir: Path) -> Any:
    """A saved candidate as a trainable model: the teacher's kept blocks, then its own tensors."""
    import torch
    from safetensors.torch import load_file

    meta = json.loads((cdir / STUDENT_META).read_text())
    student = student_from_picks(teacher, [int(b) for b in meta["teacher_blocks"]])
    own = {k: v.to(torch.float32) for k, v in load_file(str(cdir / STUDENT_FILE)).items()}
    missing = set(own) - set(student.state_dict())
    if missing:
        raise ValueError(f"{cdir}: tensors the student does not have: {sorted(missing)[:3]}")
    student.load_state_dict(own, strict=False)
    return student.eval()


def shared_names(student: Any) -> set[str]:
    """State-dict names of the tensors shared with (and frozen like) the teacher: the token
    embedding and the LM head (one tensor when tied)."""
    ptrs = {student.get_input_embeddings().weight.data_ptr()}
    head = student.get_output_embeddings()
    if head is not None:
        ptrs.add(head.weight.data_ptr())
    return {k for k, v in student.state_dict().items() if v.data_ptr() in ptrs}


def assemble_student(teacher_dir: Path, student_dir: Path, out: Path) -> Path:
    """Write a full Hugging Face checkpoint of the student in ``out``: the teacher's config with
    the student's block count, the student's own tensors from its file, and every other tensor
    from the teacher: the shared embedding / head, and the kept blocks that training left as
    they were (student block ``i`` is teacher block ``teacher_blocks[i]``)."""

    from safetensors import safe_open
    from safetensors.numpy import save_file

    meta = json.loads((student_dir / STUDENT_META).read_text())
    picks = [int(b) for b in meta["teacher_blocks"]]
    cfg = json.loads((teacher_dir / "config.json").read_text())
    attr = next(a for a in ("num_hidden_layers", "n_layer", "num_layers") if a in cfg)
    cfg[attr] = int(meta["layers"])
    if isinstance(cfg.get("layer_types"), list):  # as student_from_picks set them
        cfg["layer_types"] = [cfg["layer_types"][i] for i in picks]
    cfg["torch_dtype"] = cfg["dtype"] = "float32"
    out.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, np.ndarray] = {}
    with safe_open(str(student_dir / STUDENT_FILE), "np") as fh:
        for key in fh.keys():  # noqa: SIM118
            tensors[key] = fh.get_tensor(key).astype(np.float32)
    for shard in sorted(teacher_dir.glob("*.safetensors")):
        with safe_open(str(shard), "np") as fh:
            for key in fh.keys():  # noqa: SIM118
                name = student_key(key, picks)
                if name is not None and name not in tensors:
                    tensors[name] = fh.get_tensor(key).astype(np.float32)
    tied = bool(cfg.get("tie_word_embeddings", True))
    missing = [k for k in meta["shared"] if k not in tensors
               and not (tied and k.startswith("lm_head."))]  # tied: the embedding is the head
    if missing:
        raise ValueError(f"teacher {teacher_dir} lacks the shared tensors {missing}")
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    for name in ("generation_config.json", "tokenizer.json", "tokenizer_config.json",
                 "special_tokens_map.json", "chat_template.jinja"):
        if (teacher_dir / name).is_file():
            shutil.copy2(teacher_dir / name, out / name)
    return out


def student_made(student_dir: Path) -> dict[str, Any]:
    """What a ladder's manifest records of how a saved student was made: its structure, the
    teacher blocks it keeps, its healing run and the candidates it was chosen from."""
    meta = json.loads((student_dir / STUDENT_META).read_text())
    keep = ("name", "layers", "teacher_blocks", "structure", "healing", "finish", "quality",
            "tasks", "quality_first_phase", "tasks_first_phase",
            "rule", "candidates", "wall_seconds", "steps", "tokens_seen", "device")
    return {k: meta[k] for k in keep if k in meta}
