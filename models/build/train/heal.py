"""Heal a depth-pruned student by logit distillation from its teacher (build time only: torch).

Everything below the first changed block is the teacher's own, frozen: its output is the
teacher's hidden state at that depth, computed once (:func:`teacher_pass`) together with the
teacher's top-``k`` next-token probabilities. Training then runs only the student's blocks from
there up, the final norm and the (frozen, tied) LM head, so the CPU budget goes to the blocks
that moved. Loss: cross-entropy against the teacher's top-``k`` distribution plus ``ce_weight``
times the ordinary next-token loss. The forward pass may run in bf16 (``precision``) where the
CPU has native bf16 matrix units; weights, optimiser and loss stay fp32.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from models.build.train.prune import Gap, fit_bridge, fold_bridge, residual_error


@dataclass
class TeacherCache:
    """What training reads instead of running the teacher: per row of token ids, the hidden
    state entering each block a candidate starts training at, and the teacher's top-k."""

    rows: np.ndarray  # [N, S + 1] token ids
    hidden: dict[int, np.ndarray]  # block -> [N, S, H] float16, the input of that block
    top_p: np.ndarray  # [N, S, k] float16, teacher probabilities of its k likeliest tokens
    top_i: np.ndarray  # [N, S, k] int32, those tokens


def save_cache(cache: TeacherCache, where: Path) -> None:
    """Keep a teacher pass on disk (``where`` a directory) so a resumed run need not redo it."""
    where.mkdir(parents=True, exist_ok=True)
    for name, arr in (("rows", cache.rows), ("top_p", cache.top_p), ("top_i", cache.top_i),
                      *((f"hidden-{b}", h) for b, h in cache.hidden.items())):
        np.save(where / f"{name}.npy", arr)


def load_cache(where: Path, rows: np.ndarray, blocks: Sequence[int],
               k: int) -> TeacherCache | None:
    """The teacher pass kept in ``where`` if it was made over ``rows`` with these ``blocks`` and
    ``k``; else ``None``."""
    try:
        kept = np.load(where / "rows.npy")
        top_p = np.load(where / "top_p.npy", mmap_mode="r")
        hidden = {b: np.load(where / f"hidden-{b}.npy", mmap_mode="r") for b in blocks}
    except FileNotFoundError:
        return None
    if not np.array_equal(kept, rows) or top_p.shape[-1] != k:
        return None
    return TeacherCache(kept, hidden, top_p, np.load(where / "top_i.npy", mmap_mode="r"))


def precision(name: str) -> str:
    """``"bf16"`` or ``"fp32"``: ``"auto"`` is bf16 where the CPU multiplies bf16 natively
    (AVX512-BF16 / AMX, through oneDNN), else fp32."""
    import torch

    if name == "auto":
        return "bf16" if torch.ops.mkldnn._is_mkldnn_bf16_supported() else "fp32"
    if name not in ("bf16", "fp32"):
        raise ValueError(f"precision must be auto, bf16 or fp32, got {name!r}")
    return name


def teacher_pass(teacher: Any, rows: np.ndarray, blocks: Sequence[int], k: int,
                 batch: int = 8) -> TeacherCache:
    """Run the teacher once over ``rows`` (``[N, S + 1]``; inputs are ``rows[:, :-1]``)."""
    import torch

    n, s = rows.shape[0], rows.shape[1] - 1
    hidden_size = int(teacher.config.hidden_size)
    hidden = {b: np.empty((n, s, hidden_size), np.float16) for b in blocks}
    top_p = np.empty((n, s, k), np.float16)
    top_i = np.empty((n, s, k), np.int32)
    with torch.no_grad():
        for lo in range(0, n, batch):
            x = torch.from_numpy(rows[lo:lo + batch, :-1])
            out = teacher(input_ids=x, output_hidden_states=True)
            for b in blocks:
                hidden[b][lo:lo + batch] = out.hidden_states[b].numpy()
            probs, idx = torch.softmax(out.logits.float(), -1).topk(k, dim=-1)
            top_p[lo:lo + batch] = probs.numpy()
            top_i[lo:lo + batch] = idx.numpy()
    return TeacherCache(rows, hidden, top_p, top_i)


def calibration_states(teacher: Any, rows: np.ndarray) -> tuple[list[np.ndarray],
                                                                  list[np.ndarray]]:
    """Every block's input hidden state and MLP output over ``rows``, flattened to
    ``[tokens, hidden]`` float32: ``hidden[i]`` enters block ``i``, ``mlp[i]`` is block ``i``'s
    MLP output (so ``hidden[i + 1] = residual_i + mlp[i]``)."""
    import torch

    layers = teacher.model.layers
    mlp: list[list[np.ndarray]] = [[] for _ in layers]
    hooks = [layer.mlp.register_forward_hook(
        lambda _m, _i, out, j=j: mlp[j].append(out.detach().reshape(-1, out.shape[-1]).numpy()))
        for j, layer in enumerate(layers)]
    hidden: list[list[np.ndarray]] = [[] for _ in layers]
    try:
        with torch.no_grad():
            for lo in range(0, rows.shape[0], 8):
                out = teacher(input_ids=torch.from_numpy(rows[lo:lo + 8, :-1]),
                              output_hidden_states=True)
                for j in range(len(layers)):
                    h = out.hidden_states[j]
                    hidden[j].append(h.reshape(-1, h.shape[-1]).numpy())
    finally:
        for h in hooks:
            h.remove()
    return [np.concatenate(h) for h in hidden], [np.concatenate(m) for m in mlp]


def bridge_student(student: Any, gap: Gap, hidden: list[np.ndarray],
                   mlp: list[np.ndarray], ridge: float) -> dict[str, float]:
    """Fold the least-squares bridge for ``gap`` into the MLP of the block before it (student
    block ``gap.start - 1``: every block before the gap is kept); return the fit's errors."""
    import torch

    last = gap.start - 1
    m = mlp[last]
    target = hidden[gap.start + gap.length]
    residual = hidden[gap.start] - m  # h_{start} = r + m
    # every token weighs alike: the next block normalises its input, so a token's direction
    # matters, not its (outlier-dominated) size
    w = 1.0 / (np.linalg.norm(target, axis=-1, keepdims=True) + 1e-6)
    bridge = fit_bridge(m * w, residual * w, target * w, ridge)
    down = student.model.layers[last].mlp.down_proj
    with torch.no_grad():
        down.weight.copy_(torch.from_numpy(fold_bridge(down.weight.numpy(), bridge)))
    return {"error_plain_cut": residual_error(m, residual, target, None),
            "error_bridged": residual_error(m, residual, target, bridge)}


def forward_from(student: Any, first: int, h: Any) -> Any:
    """Logits of ``student`` given ``h``, the hidden state entering its block ``first``."""
    import torch

    pos = torch.arange(h.shape[1]).unsqueeze(0).expand(h.shape[0], -1)
    emb = student.model.rotary_emb(h, pos)
    for layer in student.model.layers[first:]:
        out = layer(h, attention_mask=None, position_ids=pos, position_embeddings=emb)
        h = out[0] if isinstance(out, tuple) else out
    return student.lm_head(student.model.norm(h))


def heal(student: Any, first: int, cache: TeacherCache, cfg: dict[str, Any],
         seconds: float, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Train ``cfg['train_blocks']`` of the student's blocks from ``first`` (all up to the last
    by default) and its final norm on ``cache`` for at most ``cfg['steps']`` steps or
    ``seconds``, a cosine schedule fitted to whichever ends first; return the training
    record."""
    import torch
    import torch.nn.functional as F  # noqa: N812

    torch.manual_seed(int(cfg["seed"]))
    rng = np.random.default_rng(int(cfg["seed"]))
    for p in student.parameters():
        p.requires_grad_(False)
    blocks = int(cfg.get("train_blocks", len(student.model.layers)))
    train = list(student.model.layers[first:first + blocks]) + [student.model.norm]
    params = [p for mod in train for p in mod.parameters()]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=float(cfg["lr"]), betas=(0.9, 0.95),
                            weight_decay=float(cfg.get("weight_decay", 0.0)))
    bsz, total, warm = int(cfg["batch_size"]), int(cfg["steps"]), int(cfg["warmup_steps"])
    ce_w, src = float(cfg["ce_weight"]), cache.hidden[first]
    dtype = precision(str(cfg.get("precision", "fp32")))
    n = src.shape[0]
    started = time.monotonic()
    curve: list[dict[str, float]] = []
    step = 0
    student.train()
    while step < total:
        if step == 10:  # fit the schedule to the time left at the measured rate
            rate = 10 / (time.monotonic() - started)
            total = min(total, int(rate * seconds * 0.97))
        lr = float(cfg["lr"]) * (min(1.0, (step + 1) / warm) if step < warm else
                                 0.1 + 0.45 * (1 + math.cos(math.pi * (step - warm)
                                                            / max(1, total - warm))))
        for g in opt.param_groups:
            g["lr"] = lr
        idx = np.sort(rng.choice(n, size=bsz, replace=False))
        h = torch.from_numpy(src[idx].astype(np.float32))
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16"):
            logits = forward_from(student, first, h)  # master weights and the loss stay fp32
        logp = F.log_softmax(logits.float(), -1)
        tp = torch.from_numpy(cache.top_p[idx].astype(np.float32))
        kd = -(tp * logp.gather(-1, torch.from_numpy(cache.top_i[idx]).long())).sum(-1).mean()
        ce = F.nll_loss(logp.flatten(0, 1), torch.from_numpy(cache.rows[idx, 1:]).flatten())
        loss = kd + ce_w * ce
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        if step % int(cfg["log_every"]) == 0 or step == 1:
            point = {"step": step, "kd": round(float(kd.detach()), 4),
                     "ce": round(float(ce.detach()), 4),
                     "s": round(time.monotonic() - started, 1)}
            curve.append(point)
            log(json.dumps(point))
    student.eval()
    return {"steps": step, "precision": dtype, "tokens": step * bsz * int(src.shape[1]),
            "trained_blocks": [first, min(first + blocks, len(student.model.layers)) - 1],
            "trained_parameters": sum(p.numel() for p in params),
            "seconds": round(time.monotonic() - started, 1), "curve": curve}
