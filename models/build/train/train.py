"""Train the default teacher from scratch, or distil a student from it (build time only: torch).

Reproducible: seeded, configured by a TOML file, resumable from the checkpoint it writes every
``checkpoint_every`` steps. Distillation loss is ``alpha * T^2 * KL(teacher_T || student_T) +
(1 - alpha) * CE``, with ``T`` the softening temperature.
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from models.build.train.corpus import EOT
from models.build.train.schedule import lr_at


@dataclass(frozen=True)
class TrainConfig:
    """A parsed training config file (paths relative to the working directory)."""

    seed: int
    out_dir: Path
    corpus: Path
    model: dict[str, Any]
    train: dict[str, Any]
    teacher: Path | None = None
    tokenizer_vocab_size: int = 8192
    distill: dict[str, Any] | None = None
    init_from_teacher: bool = False  # student = teacher's config with fewer layers, copied in

    @classmethod
    def load(cls, path: Path) -> TrainConfig:
        raw = tomllib.loads(path.read_text())
        return cls(
            seed=int(raw["seed"]),
            out_dir=Path(raw["out_dir"]),
            corpus=Path(raw["corpus"]),
            model=dict(raw["model"]),
            train=dict(raw["train"]),
            teacher=Path(raw["teacher"]) if raw.get("teacher") else None,
            tokenizer_vocab_size=int(raw.get("tokenizer_vocab_size", 8192)),
            distill=dict(raw["distill"]) if raw.get("distill") else None,
            init_from_teacher=bool(raw.get("init_from_teacher", False)),
        )


def _encode_corpus(corpus: Path, tokenizer_json: Path, cache_dir: Path, eot: int) -> np.ndarray:
    """Token ids of the whole corpus as uint16, cached by (corpus, tokenizer) hash."""
    from tokenizers import Tokenizer

    digest = hashlib.sha256(corpus.read_bytes() + tokenizer_json.read_bytes()).hexdigest()[:16]
    cached = cache_dir / f"tokens-{digest}.npy"
    if cached.exists():
        return np.load(cached)
    tok = Tokenizer.from_file(str(tokenizer_json))
    docs = corpus.read_text(encoding="utf-8").split(f"\n{EOT}\n")
    ids: list[int] = []
    for enc in tok.encode_batch(docs):
        ids.extend(enc.ids)
        ids.append(eot)
    arr = np.asarray(ids, dtype=np.uint16 if tok.get_vocab_size() < 65536 else np.int32)
    cache_dir.mkdir(parents=True, exist_ok=True)
    np.save(cached, arr)
    return arr


def train(config_path: Path, checkpoint_dir: Path, threads: int = 2,
          until: int | None = None) -> dict[str, Any]:
    """Run (or resume) the training described by ``config_path``; return its summary."""
    summary = run(TrainConfig.load(config_path), checkpoint_dir, threads, until=until)
    summary["config"] = str(config_path)
    if not summary.get("finished", True):
        return summary
    (Path(summary["out_dir"]) / "training.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def run(cfg: TrainConfig, checkpoint_dir: Path, threads: int = 2, progress: bool = True,
        until: int | None = None) -> dict[str, Any]:
    """Train (or distil) as ``cfg`` says, resuming from ``checkpoint_dir/last.pt``.

    ``until`` stops after that step with a checkpoint written (the run resumes later exactly
    where it stopped); the model is only saved to ``out_dir`` once all steps are done.
    """
    import torch

    torch.set_num_threads(threads)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    cfg.out_dir.mkdir(parents=True, exist_ok=True)
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    tok_json = _tokenizer(cfg)
    teacher, vocab, eot_id = _teacher(cfg, tok_json)
    data = _encode_corpus(cfg.corpus, tok_json, Path(".cache/corpus"), int(eot_id or 0))
    model, opt, step = _model_and_optimizer(cfg, teacher, vocab, eot_id, checkpoint_dir)
    started = time.monotonic()
    step, losses = _train_loop(cfg, model, opt, teacher, data, step, checkpoint_dir / "last.pt",
                               progress, until)
    if step < cfg.train["steps"]:
        return {"out_dir": str(cfg.out_dir), "steps": step, "finished": False}
    model.eval()
    model.to(torch.float16).save_pretrained(str(cfg.out_dir), safe_serialization=True)
    return {
        "out_dir": str(cfg.out_dir),
        "steps": step,
        "tokens_seen": step * cfg.train["seq_len"] * cfg.train["batch_size"],
        "final_ce_mean_last_50": float(np.mean(losses[-50:])) if losses else None,
        "parameters": sum(p.numel() for p in model.parameters()),
        "wall_seconds_this_run": round(time.monotonic() - started, 1),
        "distilled_from": str(cfg.teacher) if cfg.teacher else None,
    }


def _tokenizer(cfg: TrainConfig) -> Path:
    """``out_dir/tokenizer.json``: a teacher's, copied, or one trained on the corpus."""
    from models.build.train.tokenizer import save_hf_tokenizer, train_tokenizer

    tok_json = cfg.out_dir / "tokenizer.json"
    if cfg.teacher:
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                     "vocab.json", "merges.txt", "tokenizer.model"):
            if (cfg.teacher / name).exists():
                shutil.copyfile(cfg.teacher / name, cfg.out_dir / name)
        if not tok_json.exists():
            from transformers import AutoTokenizer

            AutoTokenizer.from_pretrained(str(cfg.teacher)).backend_tokenizer.save(str(tok_json))
    elif not tok_json.exists():
        tok = train_tokenizer(cfg.corpus, cfg.tokenizer_vocab_size)
        save_hf_tokenizer(tok, cfg.out_dir, cfg.model["max_position_embeddings"])
    return tok_json


def _teacher(cfg: TrainConfig, tok_json: Path) -> tuple[Any, int, int | None]:
    """(the frozen teacher or None, the vocabulary size, the end-of-text id)."""
    import torch
    from tokenizers import Tokenizer

    hf_tok = Tokenizer.from_file(str(tok_json))
    vocab, eot_id = hf_tok.get_vocab_size(), hf_tok.token_to_id(EOT)
    if not cfg.teacher:
        return None, vocab, eot_id
    from transformers import AutoModelForCausalLM

    teacher = AutoModelForCausalLM.from_pretrained(str(cfg.teacher), dtype=torch.float32)
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    if eot_id is None:
        eos = teacher.config.eos_token_id
        eot_id = int(eos[0] if isinstance(eos, list) else eos or 0)
    return teacher, int(teacher.config.vocab_size), eot_id


def _model_and_optimizer(cfg: TrainConfig, teacher: Any, vocab: int, eot_id: int | None,
                         checkpoint_dir: Path) -> tuple[Any, Any, int]:
    """The model (fresh, or a student of the teacher's blocks), its AdamW, and the step it
    resumes from (its checkpoint restored where one is)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tcfg = cfg.train
    if cfg.init_from_teacher and teacher is not None:
        from models.build.train.student import student_from_teacher

        model, _ = student_from_teacher(teacher, int(cfg.model["num_hidden_layers"]))
    else:
        model = LlamaForCausalLM(LlamaConfig(
            vocab_size=vocab, bos_token_id=eot_id, eos_token_id=eot_id, pad_token_id=eot_id,
            tie_word_embeddings=True, rms_norm_eps=1e-5, attention_bias=False, **cfg.model))
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": tcfg["weight_decay"]},
         {"params": no_decay, "weight_decay": 0.0}],
        lr=tcfg["lr"], betas=(0.9, 0.95),
    )
    step = 0
    ckpt = checkpoint_dir / "last.pt"
    if ckpt.exists():
        state = torch.load(ckpt, weights_only=False)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        step = int(state["step"])
        torch.set_rng_state(state["torch_rng"])
        np.random.set_state(state["np_rng"])
    return model, opt, step


def _train_loop(cfg: TrainConfig, model: Any, opt: Any, teacher: Any, data: np.ndarray,
                step: int, ckpt: Path, progress: bool,
                until: int | None) -> tuple[int, list[float]]:
    """Steps from ``step`` to the planned total (or ``until``), a checkpoint every
    ``checkpoint_every`` and at the stop; returns the step reached and each step's CE."""
    import torch
    import torch.nn.functional as F  # noqa: N812
    from tqdm import tqdm

    tcfg = cfg.train
    seq, bsz = tcfg["seq_len"], tcfg["batch_size"]
    rng_high = len(data) - seq - 1
    model.train()
    losses: list[float] = []
    bar = tqdm(total=tcfg["steps"], initial=step, desc=cfg.out_dir.name, unit="step",
               disable=not progress)
    stop_at = min(tcfg["steps"], until) if until is not None else tcfg["steps"]
    while step < stop_at:
        starts = np.random.randint(0, rng_high, size=bsz)
        batch = np.stack([data[s : s + seq + 1] for s in starts]).astype(np.int64)
        x = torch.from_numpy(batch[:, :-1])
        y = torch.from_numpy(batch[:, 1:])
        for group in opt.param_groups:
            group["lr"] = lr_at(step, tcfg)
        logits = model(input_ids=x).logits
        vocab = logits.shape[-1]
        ce = F.cross_entropy(logits.reshape(-1, vocab), y.reshape(-1))
        loss = ce
        if teacher is not None and cfg.distill:
            temp, alpha = float(cfg.distill["temperature"]), float(cfg.distill["alpha"])
            with torch.no_grad():
                t_logits = teacher(input_ids=x).logits
            kl = F.kl_div(
                F.log_softmax(logits / temp, dim=-1).reshape(-1, vocab),
                F.log_softmax(t_logits / temp, dim=-1).reshape(-1, vocab),
                log_target=True,
                reduction="batchmean",
            ) * temp * temp
            loss = alpha * kl + (1 - alpha) * ce
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), tcfg["grad_clip"])
        opt.step()
        step += 1
        losses.append(float(ce.detach()))
        bar.set_postfix(loss=f"{float(loss.detach()):.3f}", ce=f"{float(ce.detach()):.3f}")
        bar.update(1)
        if step % tcfg["checkpoint_every"] == 0 or step == stop_at:
            torch.save(
                {"model": model.state_dict(), "opt": opt.state_dict(), "step": step,
                 "torch_rng": torch.get_rng_state(), "np_rng": np.random.get_state()},
                ckpt,
            )
    bar.close()
    return step, losses
