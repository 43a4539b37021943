"""One distillation run's state and loop (:func:`models.build.train.distil.distil` drives it):
the student made from the teacher's blocks, its optimizer, the loss against the teacher, the
checkpoint it resumes from, the curve it logs."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from models.build.train.schedule import lr_at
from models.build.train.student import shared_names, student_from_teacher


class DistilRun:
    """The student, its optimizer and its loss against the teacher, resumed from ``ckpt``
    where a checkpoint is."""

    def __init__(self, teacher: Any, config: dict[str, Any], device: str,
                 train_rows: np.ndarray, val_rows: np.ndarray, ckpt: Path) -> None:
        import torch

        self.teacher, self.device, self.ckpt = teacher, device, ckpt
        self.train_rows, self.val_rows = train_rows, val_rows
        self.tcfg, dcfg = config["train"], config["distill"]
        self.student, self.picks = student_from_teacher(teacher, int(config["layers"]))
        self.student.to(device)
        self.shared = shared_names(self.student)
        for name, p in self.student.named_parameters():
            p.requires_grad_(name not in self.shared)
        self.params = [p for p in self.student.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(
            [{"params": [p for p in self.params if p.ndim >= 2],
              "weight_decay": self.tcfg["weight_decay"]},
             {"params": [p for p in self.params if p.ndim < 2], "weight_decay": 0.0}],
            lr=self.tcfg["lr"], betas=(0.9, 0.95))
        self.step, self.curve = 0, []
        if ckpt.exists():
            state = torch.load(ckpt, weights_only=False, map_location=device)
            self.student.load_state_dict(state["model"])
            self.opt.load_state_dict(state["opt"])
            self.step, self.curve = int(state["step"]), list(state["curve"])
            torch.set_rng_state(state["torch_rng"])
            np.random.set_state(state["np_rng"])
        self.temp, self.alpha = float(dcfg["temperature"]), float(dcfg["alpha"])
        self.bsz, self.total = int(self.tcfg["batch_size"]), int(self.tcfg["steps"])
        self.autocast = (torch.autocast("cuda", dtype=torch.bfloat16)
                         if device.startswith("cuda") else torch.autocast("cpu", enabled=False))

    def losses(self, batch: np.ndarray) -> tuple[Any, Any, Any]:
        """(the distillation loss, cross-entropy, KL) of the student on ``batch``."""
        import torch
        import torch.nn.functional as F  # noqa: N812

        x = torch.from_numpy(batch[:, :-1]).to(self.device)
        y = torch.from_numpy(batch[:, 1:]).to(self.device)
        with self.autocast:
            with torch.no_grad():
                t_logits = self.teacher(input_ids=x).logits.float()
            s_logits = self.student(input_ids=x).logits.float()
        vocab, temp = s_logits.shape[-1], self.temp
        ce = F.cross_entropy(s_logits.reshape(-1, vocab), y.reshape(-1))
        kl = F.kl_div(F.log_softmax(s_logits / temp, dim=-1).reshape(-1, vocab),
                      F.log_softmax(t_logits / temp, dim=-1).reshape(-1, vocab),
                      log_target=True, reduction="batchmean") * temp * temp
        return self.alpha * kl + (1 - self.alpha) * ce, ce, kl

    def validate(self) -> float:
        """The student's cross-entropy on the held-out rows."""
        import torch

        self.student.eval()
        rows, bsz = self.val_rows, self.bsz
        with torch.no_grad():
            vals = [float(self.losses(rows[i : i + bsz])[1]) for i in range(0, len(rows), bsz)]
        self.student.train()
        return float(np.mean(vals))

    def teacher_ce(self) -> float:
        """The teacher's cross-entropy on the held-out rows (what the student is held to)."""
        import torch
        import torch.nn.functional as F  # noqa: N812

        rows, bsz, dev = self.val_rows, self.bsz, self.device
        with torch.no_grad():
            return float(np.mean([
                float(F.cross_entropy(
                    self.teacher(input_ids=torch.from_numpy(rows[i:i + bsz, :-1]).to(dev))
                    .logits.float().flatten(0, 1),
                    torch.from_numpy(rows[i:i + bsz, 1:]).to(dev).flatten()))
                for i in range(0, len(rows), bsz)]))

    def train(self, started: float, deadline_s: float | None, log: Any) -> bool:
        """Steps until the planned total (fitted to a time budget after 20 steps where the
        config has one) or the deadline; returns whether the deadline cut it short."""
        import torch

        tcfg = self.tcfg
        self.student.train()
        budget = tcfg.get("time_budget_s")
        resumed_at, t_train = self.step, time.monotonic()
        while self.step < self.total:
            if budget is not None and self.step == resumed_at + 20:
                # fit the cosine schedule to the time left: measured rate x remaining budget
                rate = 20 / (time.monotonic() - t_train)
                left = float(budget) - (time.monotonic() - started)
                self.total = tcfg["steps"] = min(self.total,
                                                 self.step + max(1, int(0.95 * rate * left)))
                log(f"{rate:.2f} steps/s: {self.total} steps fit the time budget")
            if deadline_s is not None and time.monotonic() - started > deadline_s:
                return True
            batch = self.train_rows[np.random.randint(0, len(self.train_rows), size=self.bsz)]
            for group in self.opt.param_groups:
                group["lr"] = lr_at(self.step, tcfg)
            loss, ce, kl = self.losses(batch)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.params, tcfg["grad_clip"])
            self.opt.step()
            self.step += 1
            self._record(loss, ce, kl, started, log)
        return False

    def _record(self, loss: Any, ce: Any, kl: Any, started: float, log: Any) -> None:
        """The curve's point every ``log_every`` steps (validated every tenth); the checkpoint
        every ``checkpoint_every``."""
        import torch

        step, every = self.step, int(self.tcfg["log_every"])
        if step % every == 0 or step == 1:
            point = {"step": step, "loss": float(loss), "ce": float(ce), "kl": float(kl),
                     "s": round(time.monotonic() - started, 1)}
            if step % (every * 10) == 0:
                point["val_ce"] = self.validate()
            self.curve.append(point)
            log(json.dumps(point))
        if step % int(self.tcfg["checkpoint_every"]) == 0:
            torch.save({"model": self.student.state_dict(), "opt": self.opt.state_dict(),
                        "step": step, "curve": self.curve, "torch_rng": torch.get_rng_state(),
                        "np_rng": np.random.get_state()}, self.ckpt)
