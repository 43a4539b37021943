"""Distil a layer-dropped student from a pretrained teacher (build time only: torch).

The student is the teacher's architecture with fewer blocks, initialised from evenly spaced
teacher blocks (DistilBERT's recipe). It shares the teacher's token embedding and tied LM head,
frozen, so only its blocks and final norm are trained and saved (``student.safetensors``, fp16):
a ladder rebuilds the whole student from the teacher plus that file (:func:`assemble_student`).

Loss: ``alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * CE`` over the answer tokens of
teacher-generated chats (:mod:`models.build.train.selfgen`), plus the prompt tokens. Seeded,
configured by a TOML file, resumable from the checkpoint written every ``checkpoint_every`` steps;
runs on CPU or CUDA (bf16 autocast on CUDA).
"""

from __future__ import annotations

import json
import math
import random
import time
import tomllib
from pathlib import Path
from typing import Any

import numpy as np

from models.build.train.schedule import lr_at
from models.build.train.student import (
    STUDENT_FILE,
    STUDENT_META,
    assemble_student,
    shared_names,
    student_from_teacher,
)


def _pack(seqs: list[list[int]], seq_len: int, pad: int) -> np.ndarray:
    """Concatenate the sequences and cut ``seq_len + 1``-token rows (the last one padded)."""
    flat = np.fromiter((t for s in seqs for t in s), dtype=np.int64)
    rows = max(1, math.ceil(len(flat) / (seq_len + 1)))
    flat = np.concatenate([flat, np.full(rows * (seq_len + 1) - len(flat), pad)])
    return flat.reshape(rows, seq_len + 1)


def distil(teacher: Any, tokenizer: Any, config: dict[str, Any], out_dir: Path,
           checkpoint_dir: Path, device: str = "cpu", exclude: list[str] | None = None,
           deadline_s: float | None = None, log: Any = print,
           rows: np.ndarray | None = None) -> dict[str, Any]:
    """Generate the data (or take ``rows`` of ``seq_len + 1`` token ids), train the student and
    save its own tensors in ``out_dir``.

    ``deadline_s`` (seconds from now) ends training early with the cosine schedule cut short;
    the summary says so. The checkpoint lets a later run resume where this one stopped.
    """
    import torch
    import torch.nn.functional as F  # noqa: N812
    from safetensors.torch import save_file

    from models.build.train.selfgen import generate_sequences, make_prompts

    started = time.monotonic()
    seed = int(config["seed"])
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    tcfg, dcfg, gcfg = config["train"], config["distill"], config["data"]
    out_dir.mkdir(parents=True, exist_ok=True)
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    eos = int(config["eos_token_id"])

    data_file = checkpoint_dir / "data.npy"
    if rows is not None:
        pass
    elif data_file.exists():
        rows = np.load(data_file)
    else:
        prompts = make_prompts(int(gcfg["prompts"]), seed, exclude or [])
        t0 = time.monotonic()
        seqs = generate_sequences(teacher, tokenizer, prompts, int(gcfg["max_new_tokens"]),
                                  int(gcfg["batch_size"]), float(gcfg["temperature"]),
                                  float(gcfg["top_p"]), seed, eos, device)
        rows = _pack(seqs, int(tcfg["seq_len"]), eos)
        np.save(data_file, rows)
        log(f"generated {len(seqs)} chats, {sum(map(len, seqs))} tokens in "
            f"{time.monotonic() - t0:.0f} s")
    text = config["data"].get("text_rows")
    if text is not None:  # general text beside the chats: interleave so both are in every epoch
        rows = np.concatenate([rows, text])
        rows = rows[np.random.default_rng(seed).permutation(len(rows))]
    holdout = max(1, len(rows) // 50)
    val_rows, train_rows = rows[:holdout], rows[holdout:]

    student, picks = student_from_teacher(teacher, int(config["layers"]))
    student.to(device)
    shared = shared_names(student)
    for name, p in student.named_parameters():
        p.requires_grad_(name not in shared)
    params = [p for p in student.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(
        [{"params": [p for p in params if p.ndim >= 2], "weight_decay": tcfg["weight_decay"]},
         {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}],
        lr=tcfg["lr"], betas=(0.9, 0.95))
    step, curve = 0, []
    ckpt = checkpoint_dir / "last.pt"
    if ckpt.exists():
        state = torch.load(ckpt, weights_only=False, map_location=device)
        student.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        step, curve = int(state["step"]), list(state["curve"])
        torch.set_rng_state(state["torch_rng"])
        np.random.set_state(state["np_rng"])

    temp, alpha = float(dcfg["temperature"]), float(dcfg["alpha"])
    bsz, total = int(tcfg["batch_size"]), int(tcfg["steps"])
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.startswith("cuda")
                else torch.autocast("cpu", enabled=False))

    def losses(batch: np.ndarray) -> tuple[Any, Any, Any]:
        x = torch.from_numpy(batch[:, :-1]).to(device)
        y = torch.from_numpy(batch[:, 1:]).to(device)
        with autocast:
            with torch.no_grad():
                t_logits = teacher(input_ids=x).logits.float()
            s_logits = student(input_ids=x).logits.float()
        vocab = s_logits.shape[-1]
        ce = F.cross_entropy(s_logits.reshape(-1, vocab), y.reshape(-1))
        kl = F.kl_div(F.log_softmax(s_logits / temp, dim=-1).reshape(-1, vocab),
                      F.log_softmax(t_logits / temp, dim=-1).reshape(-1, vocab),
                      log_target=True, reduction="batchmean") * temp * temp
        return alpha * kl + (1 - alpha) * ce, ce, kl

    def validate() -> float:
        student.eval()
        with torch.no_grad():
            vals = [float(losses(val_rows[i : i + bsz])[1]) for i in range(0, len(val_rows), bsz)]
        student.train()
        return float(np.mean(vals))

    student.train()
    cut_short = False
    budget = tcfg.get("time_budget_s")
    resumed_at, t_train = step, time.monotonic()
    while step < total:
        if budget is not None and step == resumed_at + 20:
            # fit the cosine schedule to the time left: measured rate x remaining budget
            rate = 20 / (time.monotonic() - t_train)
            left = float(budget) - (time.monotonic() - started)
            total = tcfg["steps"] = min(total, step + max(1, int(0.95 * rate * left)))
            log(f"{rate:.2f} steps/s: {total} steps fit the time budget")
        if deadline_s is not None and time.monotonic() - started > deadline_s:
            cut_short = True
            break
        batch = train_rows[np.random.randint(0, len(train_rows), size=bsz)]
        for group in opt.param_groups:
            group["lr"] = lr_at(step, tcfg)
        loss, ce, kl = losses(batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, tcfg["grad_clip"])
        opt.step()
        step += 1
        if step % int(tcfg["log_every"]) == 0 or step == 1:
            point = {"step": step, "loss": float(loss), "ce": float(ce), "kl": float(kl),
                     "s": round(time.monotonic() - started, 1)}
            if step % (int(tcfg["log_every"]) * 10) == 0:
                point["val_ce"] = validate()
            curve.append(point)
            log(json.dumps(point))
        if step % int(tcfg["checkpoint_every"]) == 0:
            torch.save({"model": student.state_dict(), "opt": opt.state_dict(), "step": step,
                        "curve": curve, "torch_rng": torch.get_rng_state(),
                        "np_rng": np.random.get_state()}, ckpt)

    with torch.no_grad():
        t_val = float(np.mean([
            float(F.cross_entropy(teacher(input_ids=torch.from_numpy(val_rows[i:i + bsz, :-1])
                                          .to(device)).logits.float().flatten(0, 1),
                                  torch.from_numpy(val_rows[i:i + bsz, 1:]).to(device)
                                  .flatten()))
            for i in range(0, len(val_rows), bsz)]))
    own = {k: v.detach().to("cpu", torch.float16).contiguous()
           for k, v in student.state_dict().items() if k not in shared}
    save_file(own, str(out_dir / STUDENT_FILE), metadata={"format": "pt"})
    summary = {
        "layers": int(config["layers"]),
        "teacher_blocks": picks,
        "shared": sorted(shared),
        "steps": step,
        "steps_planned": total,
        "cut_short_by_deadline": cut_short,
        "tokens_seen": step * bsz * int(tcfg["seq_len"]),
        "train_rows": int(len(train_rows)),
        "seq_len": int(tcfg["seq_len"]),
        "val_ce_student": validate(),
        "val_ce_teacher": t_val,
        "trainable_parameters": sum(p.numel() for p in params),
        "device": device,
        "wall_seconds": round(time.monotonic() - started, 1),
        "config": {**config, "data": {k: v for k, v in config["data"].items()
                                      if k != "text_rows"}},
        "curve": curve,
    }
    (out_dir / STUDENT_META).write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def distil_on_corpus(teacher_dir: Path, layers: int, steps: int, corpus: Path, work: Path,
                     threads: int = 2, log: Any = print) -> Path:
    """A ``layers``-block student of ``teacher_dir`` distilled on a text file (CPU, small
    settings: ``greenroute build --distill-layers N --corpus FILE``); return the assembled
    Hugging Face checkpoint of the student."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(threads)
    tokenizer = AutoTokenizer.from_pretrained(str(teacher_dir))
    teacher = AutoModelForCausalLM.from_pretrained(str(teacher_dir), dtype=torch.float32).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    eos = teacher.config.eos_token_id
    eos = int((eos[0] if isinstance(eos, list) else eos) or 0)
    config = {
        "seed": 1234, "layers": layers, "eos_token_id": eos,
        "data": {}, "distill": {"temperature": 2.0, "alpha": 0.7},
        "train": {"seq_len": 128, "batch_size": 8, "steps": steps,
                  "warmup_steps": max(1, steps // 20), "lr": 1e-3, "min_lr": 1e-4,
                  "weight_decay": 0.01, "grad_clip": 1.0, "log_every": max(1, steps // 10),
                  "checkpoint_every": max(1, steps // 4)},
    }
    ids = tokenizer(corpus.read_text(encoding="utf-8"), add_special_tokens=False)["input_ids"]
    if len(ids) < 2 * 129:
        raise ValueError(f"corpus {corpus} has only {len(ids)} tokens: too little to distil on")
    rows = _pack([list(ids)], 128, eos)
    blocks = work / "student-blocks"
    distil(teacher, tokenizer, config, blocks, work / "student-checkpoints", "cpu", log=log,
           rows=rows)
    return assemble_student(teacher_dir, blocks, work / "student")


def load_config(path: Path) -> dict[str, Any]:
    return tomllib.loads(path.read_text())


def main(argv: list[str] | None = None) -> None:
    """``python -m models.build.train.distil --config TOML (--teacher DIR | --gguf FILE)
    --out DIR``"""
    import argparse

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("--config", required=True, type=Path)
    ap.add_argument("--teacher", type=Path, help="Hugging Face checkpoint directory")
    ap.add_argument("--gguf", type=Path, help="a GGUF file (dequantized to fp32)")
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--checkpoints", type=Path, default=Path(".cache/distil"))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--exclude", type=Path, help="JSONL whose 'question's are never prompts")
    ap.add_argument("--text", type=Path, help="general text (.txt or .txt.gz, documents joined "
                    "by <|endoftext|>) distilled on beside the generated chats")
    args = ap.parse_args(argv)
    config = load_config(args.config)
    if args.gguf:
        kw: dict[str, Any] = {"gguf_file": args.gguf.name}
        src = args.gguf.parent
    else:
        kw, src = {}, args.teacher
    tokenizer = AutoTokenizer.from_pretrained(str(src), **kw)
    teacher = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32, **kw)
    teacher.to(args.device).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    if args.device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True
    exclude = []
    if args.exclude and args.exclude.is_file():
        exclude = [json.loads(line)["question"] for line in args.exclude.read_text().splitlines()
                   if line.strip()]
    if args.text:
        import gzip
        import hashlib

        raw = args.text.read_bytes()
        body = (gzip.decompress(raw) if args.text.suffix == ".gz" else raw).decode("utf-8")
        docs = [d for d in body.split("\n<|endoftext|>\n") if d.strip()]
        eot = tokenizer.convert_tokens_to_ids("<|endoftext|>")
        ids = [t for enc in tokenizer(docs, add_special_tokens=False)["input_ids"]
               for t in (*enc, eot)]
        config["data"]["text_rows"] = _pack([ids], int(config["train"]["seq_len"]), eot)
        config["data"]["text"] = {"file": args.text.name, "tokens": len(ids),
                                  "sha256": hashlib.sha256(raw).hexdigest()}
    summary = distil(teacher, tokenizer, config, args.out, args.checkpoints, args.device, exclude)
    print(json.dumps({k: v for k, v in summary.items() if k != "curve"}, indent=2))


if __name__ == "__main__":
    main()
