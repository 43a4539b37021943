"""One student candidate of a pruning run (:mod:`models.build.train.students`): made from the
teacher with a run of blocks cut, bridged where the bridge earns it, healed, measured; saved
(only the tensors training changed, fp16) and reused when a run with the same config made it."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from models.build.train.heal import TeacherCache, bridge_student, heal
from models.build.train.prune import Gap
from models.build.train.student import (
    STUDENT_FILE,
    STUDENT_META,
    load_candidate,
    shared_names,
    student_from_picks,
)


@dataclass
class Context:
    """What every candidate of a run is made and judged with."""

    teacher: Any
    config: dict[str, Any]
    work: Path
    total: int  # the teacher's blocks
    hidden: list[np.ndarray]  # the teacher's calibration states (the bridge's fit)
    mlp: Any
    select_rows: np.ndarray  # where cuts and bridges are judged
    teacher_ppl: float
    quality: Callable[[Any], float]  # teacher's held-out perplexity over the model's
    tasks: Callable[[Any], int]  # greedy task answers correct
    cache: Callable[[], TeacherCache]  # the teacher pass, run once when first needed
    blocks: list[int]  # the blocks healing starts from
    log: Any


def make_depth(ctx: Context, k: int, gap: Gap, searched: dict[int, Any]) -> dict[str, Any]:
    """The ``k``-block candidate: the cut, the bridge (kept only where it lowers the loss on
    text it was not fitted on), the healing, the measurements; saved in its directory."""
    import torch

    name, key = f"depth-{k}", candidate_key(ctx.config, k)
    student = student_from_picks(ctx.teacher, gap.kept(ctx.total)).eval()
    plain_q = ctx.quality(student)
    plain_ce = mean_ce(student, ctx.select_rows)
    down = student.model.layers[gap.start - 1].mlp.down_proj.weight  # the bridge's home
    before = down.detach().clone()
    errors = bridge_student(student, gap, ctx.hidden, ctx.mlp,
                            float(ctx.config["bridge"]["ridge"]))
    bridged_ce = mean_ce(student, ctx.select_rows)
    if bridged_ce >= plain_ce:  # the bridge must earn its place on text it was not fit on
        with torch.no_grad():
            down.copy_(before)
    errors.update(kept=bridged_ce < plain_ce, ce_plain_cut=plain_ce, ce_bridged=bridged_ce)
    bridged_q = ctx.quality(student)
    ctx.log(f"{name}: quality plain cut {plain_q:.3f}, with bridge {bridged_q:.3f} {errors}")
    record = heal(student, gap.start - 1, ctx.cache(),
                  {**ctx.config["heal"], "seed": int(ctx.config["seed"])},
                  float(ctx.config["heal"]["seconds"]), ctx.log)
    quality, tasks = ctx.quality(student), ctx.tasks(student)
    ctx.log(f"{name}: healed quality {quality:.3f}, tasks {tasks}/60")
    cand = {"name": name, "key": key, "layers": k, "teacher_blocks": gap.kept(ctx.total),
            "structure": {
                "kind": "depth", "dropped": [gap.start, gap.start + gap.length - 1],
                "angular_distance": round(gap.distance, 4), "bridge": "least squares, "
                f"folded into block {gap.start - 1}'s down_proj", "bridge_fit": errors,
                "searched": searched},
            "quality_plain_cut": plain_q, "quality_bridged": bridged_q,
            "quality": quality, "tasks": tasks,
            "healing": {k2: v for k2, v in record.items() if k2 != "curve"},
            "curve": record["curve"]}
    return save(student, cand, ctx.work / "candidates" / name, record["trained_blocks"])


def mean_ce(model: Any, rows: np.ndarray) -> float:
    """Mean next-token cross-entropy of ``model`` on ``rows`` (``[N, S + 1]`` token ids)."""
    import torch
    import torch.nn.functional as F  # noqa: N812

    with torch.no_grad():
        logits = model(input_ids=torch.from_numpy(rows[:, :-1])).logits.float()
        return float(F.cross_entropy(logits.flatten(0, 1),
                                     torch.from_numpy(rows[:, 1:]).flatten()))


def finish(ctx: Context, pick: dict[str, Any]) -> dict[str, Any]:
    """The second healing phase (``config["finish"]``) of the chosen candidate alone, from its
    saved tensors; saved as ``<name>-finished`` (reused when a run with this config made it)."""
    config, work, log = ctx.config, ctx.work, ctx.log
    seed = int(config["seed"])
    fin_cfg = {**config["heal"], **config["finish"], "seed": seed + 1}
    name, key = f"{pick['name']}-finished", candidate_key(config, pick["layers"], True)
    cdir = work / "candidates" / name
    done = saved(cdir, key)
    if done is not None:
        log(f"{name}: reusing {cdir}")
        return done
    student = load_candidate(ctx.teacher, work / "candidates" / pick["name"])
    first = int(pick["healing"]["trained_blocks"][0])
    record = heal(student, first, ctx.cache(), fin_cfg, float(fin_cfg["seconds"]), log)
    quality, tasks = ctx.quality(student), ctx.tasks(student)
    log(f"{name}: quality {quality:.3f}, tasks {tasks}/60")
    return save(student, {**pick, "name": name, "key": key, "quality": quality,
                           "tasks": tasks, "quality_first_phase": pick["quality"],
                           "tasks_first_phase": pick["tasks"],
                           "finish": {k: v for k, v in record.items() if k != "curve"},
                           "finish_curve": record["curve"]},
                cdir, record["trained_blocks"])


def candidate_key(config: dict[str, Any], k: int, finished: bool = False) -> str:
    """What a saved candidate was made from: a resumed run reuses it only when this matches."""
    import hashlib

    parts = {"k": k, **{s: config.get(s) for s in ("seed", "data", "bridge", "heal", "eval")}}
    if finished:
        parts["finish"] = config.get("finish")
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def saved(cdir: Path, key: str) -> dict[str, Any] | None:
    meta = cdir / STUDENT_META
    if not (meta.is_file() and (cdir / STUDENT_FILE).is_file()):
        return None
    cand = json.loads(meta.read_text())
    return cand if cand.get("key") == key else None


def save(student: Any, cand: dict[str, Any], cdir: Path, trained: list[int]) -> dict[str, Any]:
    """Write the tensors training changed (fp16) and the candidate's record to ``cdir``."""
    import torch
    from safetensors.torch import save_file

    cdir.mkdir(parents=True, exist_ok=True)
    shared = shared_names(student)
    own = {key: v.detach().to(torch.float16).contiguous()
           for key, v in student.state_dict().items()
           if key not in shared and trained_tensor(key, *trained)}
    save_file(own, str(cdir / STUDENT_FILE), metadata={"format": "pt"})
    cand = {**cand, "shared": sorted(shared)}
    (cdir / STUDENT_META).write_text(json.dumps(cand, indent=2) + "\n")
    return cand


def trained_tensor(key: str, first: int, last: int) -> bool:
    """True for the tensors healing trains: blocks ``first..last`` and the final norm."""
    from models.build.train.student import _BLOCK

    m = _BLOCK.search(key)
    return first <= int(m.group(2)) <= last if m else key.endswith("norm.weight")
