"""``greenroute train --config <prune TOML>``: make depth-pruned students of a teacher, heal
each by distillation, measure them all and keep the best (build time only: torch).

For each block count ``K`` the run of ``L - K`` blocks to drop is the one whose plain cut loses
least on in-domain text (:func:`measured_gap`; angular distances recorded beside), a
least-squares bridge is folded into the block before it when it lowers that loss
(:mod:`models.build.train.prune`), and the student healed (:mod:`models.build.train.heal`) on
teacher-written answers to in-domain prompts (none a question of the task set) and Python
documentation text (the FAQ, which is the held-out evaluation text, left out). Each candidate
is measured like the ladder measures a rung: quality is the teacher's held-out perplexity over
the student's, the task score is greedy answers to ``models/data/tasks.jsonl``. Only the
tensors that differ from the teacher are saved (fp16): a ladder rebuilds the student from the
teacher at build time.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

from models.build.train.candidates import (
    Context,
    candidate_key,
    finish,
    make_depth,
    mean_ce,
    saved,
)
from models.build.train.distil import _pack
from models.build.train.heal import (
    TeacherCache,
    calibration_states,
    load_cache,
    save_cache,
    teacher_pass,
)
from models.build.train.prune import Gap, gap_distances
from models.build.train.student import STUDENT_FILE, STUDENT_META, student_from_picks

Log = Any


def _rows(teacher: Any, tokenizer: Any, cfg: dict[str, Any], seed: int, work: Path,
          log: Log) -> np.ndarray:
    """Training rows (``seq_len + 1`` token ids each): teacher answers to in-domain prompts and
    Python documentation text, shuffled together; cached in ``work``."""
    from models.build.pipeline.tasks import load_tasks
    from models.build.train.corpus import EOT, write_distillation_text
    from models.build.train.selfgen import generate_sequences, make_prompts

    cached = work / "rows.npy"
    if cached.exists():
        return np.load(cached)
    seq = int(cfg["seq_len"])
    t0 = time.monotonic()
    prompts = make_prompts(int(cfg["prompts"]), seed, [t.question for t in load_tasks()])
    eos = int(tokenizer.convert_tokens_to_ids("<|im_end|>"))
    chats = generate_sequences(teacher, tokenizer, prompts, int(cfg["max_new_tokens"]),
                               int(cfg["gen_batch"]), float(cfg["temperature"]),
                               float(cfg["top_p"]), seed, eos, "cpu")
    chat_rows = _pack(chats, seq, eos)
    log(f"teacher wrote {len(chats)} answers ({chat_rows.size} tokens) in "
        f"{time.monotonic() - t0:.0f} s")
    docs_file = work / "docs.txt"
    write_distillation_text(docs_file)
    eot = int(tokenizer.convert_tokens_to_ids(EOT))
    docs = [d for d in docs_file.read_text(encoding="utf-8").split(f"\n{EOT}\n") if d.strip()]
    rng = np.random.default_rng(seed)
    docs = [docs[i] for i in rng.permutation(len(docs))]
    ids: list[int] = []
    for enc in tokenizer(docs, add_special_tokens=False)["input_ids"]:
        ids.extend([*enc, eot])
        if len(ids) > int(cfg["doc_rows"]) * (seq + 1):
            break
    doc_rows = _pack([ids], seq, eot)[: int(cfg["doc_rows"])]
    rows = np.concatenate([chat_rows, doc_rows])
    rows = rows[rng.permutation(len(rows))]
    np.save(cached, rows)
    return rows


def measured_gap(teacher: Any, hidden: list[np.ndarray], length: int,
                 rows: np.ndarray) -> tuple[Gap, dict[int, dict[str, float]]]:
    """The run of ``length`` blocks whose plain cut loses least on ``rows`` (in-domain text
    the bridge is not fitted on); every allowed start's angular distance and loss besides."""
    scores: dict[int, dict[str, float]] = {}
    for start, dist in gap_distances(hidden, length).items():
        cut = student_from_picks(teacher, Gap(start, length, dist).kept(len(hidden))).eval()
        scores[start] = {"angular_distance": round(dist, 4), "ce": round(mean_ce(cut, rows), 4)}
    start = min(scores, key=lambda s: (scores[s]["ce"], s))
    return Gap(start, length, scores[start]["angular_distance"]), scores


def heldout_quality(model: Any, ids: list[int], window: int) -> float:
    """Perplexity over non-overlapping ``window``-token chunks (as the ladder's quality)."""
    import torch
    import torch.nn.functional as F  # noqa: N812

    nll, count = 0.0, 0
    with torch.no_grad():
        for lo in range(0, len(ids) - 1, window):
            chunk = ids[lo:lo + window + 1]
            if len(chunk) < 2:
                break
            x = torch.tensor([chunk[:-1]])
            logits = model(input_ids=x).logits[0].float()
            nll += float(F.cross_entropy(logits, torch.tensor(chunk[1:]), reduction="sum"))
            count += len(chunk) - 1
    return float(np.exp(nll / count))


def task_score(model: Any, tokenizer: Any, eos: int, new_tokens: int = 32) -> int:
    """Greedy answers to the committed task set; how many are correct."""
    import torch

    from models.build.pipeline.tasks import load_tasks, matches

    tasks = load_tasks()
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token_id = eos
    pad = tokenizer.pad_token_id
    correct = 0
    for lo in range(0, len(tasks), 20):
        chunk = tasks[lo:lo + 20]
        text = [tokenizer.apply_chat_template([{"role": "user", "content": t.question}],
                                              add_generation_prompt=True, tokenize=False)
                for t in chunk]
        enc = tokenizer(text, return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.no_grad():
            gen = model.generate(**enc, do_sample=False, max_new_tokens=new_tokens,
                                 eos_token_id=eos, pad_token_id=pad)
        for task, row in zip(chunk, gen[:, enc["input_ids"].shape[1]:], strict=True):
            answer = tokenizer.decode(row, skip_special_tokens=True)
            correct += matches(answer, task.answers)
    return correct


def choose(cands: list[dict[str, Any]], select: dict[str, Any]) -> dict[str, Any]:
    """The fewest blocks among candidates meeting both floors; else the best task score (then
    quality, then fewer blocks)."""
    ok = [c for c in cands if c["quality"] >= float(select["quality"])
          and c["tasks"] >= int(select["tasks"])]
    if ok:
        return min(ok, key=lambda c: (c["layers"], -c["tasks"], -c["quality"]))
    return max(cands, key=lambda c: (c["tasks"], round(c["quality"], 2), -c["layers"]))


def build_students(teacher_dir: Path, config: dict[str, Any], work: Path, out: Path,
                   threads: int = 2, log: Log = print) -> dict[str, Any]:
    """Every depth of ``config["kept"]`` made, bridged, healed and measured (resumed where a
    run with this config made it), the best kept (and finished, where the config says) in
    ``out``; the run's summary."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    started = time.monotonic()
    torch.set_num_threads(threads)
    seed = int(config["seed"])
    torch.manual_seed(seed)
    work.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(str(teacher_dir))
    teacher = AutoModelForCausalLM.from_pretrained(str(teacher_dir), dtype=torch.float32,
                                                   attn_implementation="sdpa").eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    rows = _rows(teacher, tokenizer, config["data"], seed, work, log)
    ctx = _context(teacher, tokenizer, config, work, rows, log)
    cands = [reused if (reused := _reused(ctx, k, gap, log)) is not None
             else make_depth(ctx, k, gap, searched) for k, (gap, searched) in
             _gaps(ctx, work).items()]
    pick = choose(cands, config["select"])
    if "finish" in config:
        finished = finish(ctx, pick)
        cands.append(finished)
        pick = choose([finished, pick], config["select"])  # a tie goes to the finished one
    out.mkdir(parents=True, exist_ok=True)
    shutil.copy2(work / "candidates" / pick["name"] / STUDENT_FILE, out / STUDENT_FILE)
    summary = {**pick, "teacher_quality_ppl": ctx.teacher_ppl, "rule": choose.__doc__,
               "rows": int(rows.shape[0]), "seq_len": int(rows.shape[1] - 1),
               "wall_seconds": round(time.monotonic() - started, 1),
               "candidates": [{k2: v for k2, v in c.items()
                               if k2 not in ("curve", "finish_curve", "shared")}
                              for c in cands],
               "config": config}
    (out / STUDENT_META).write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _context(teacher: Any, tokenizer: Any, config: dict[str, Any], work: Path,
             rows: np.ndarray, log: Log) -> Context:
    """What every candidate of the run is made and judged with: the teacher's calibration
    states, the rows cuts are judged on, the held-out text and task set, the teacher pass."""
    from models.build.pipeline.options import DEFAULT_HELDOUT

    n_cal, n_sel = int(config["data"]["calibration_rows"]), int(config["data"]["selection_rows"])
    hidden, mlp = calibration_states(teacher, rows[:n_cal])
    held = tokenizer(DEFAULT_HELDOUT.read_text(encoding="utf-8"),
                     add_special_tokens=False)["input_ids"][: int(config["eval"]["tokens"])]
    window = int(config["eval"]["window"])
    eos = int(tokenizer.convert_tokens_to_ids("<|im_end|>"))
    blocks: list[int] = []  # the blocks before each cut: set once the cuts are known
    cached: list[TeacherCache] = []
    k_top = int(config["heal"]["top_k"])

    def cache() -> TeacherCache:  # the teacher pass, run (or read back) only when needed
        if not cached:
            t0 = time.monotonic()
            got = load_cache(work / "teacher", rows, blocks, k_top)
            if got is None:
                got = teacher_pass(teacher, rows, blocks, k_top)
                save_cache(got, work / "teacher")
            cached.append(got)
            log(f"teacher pass over {rows.shape[0]} rows in {time.monotonic() - t0:.0f} s")
        return cached[0]

    t_ppl = heldout_quality(teacher, held, window)
    return Context(teacher=teacher, config=config, work=work, total=int(
        teacher.config.num_hidden_layers), hidden=hidden, mlp=mlp,
        select_rows=rows[n_cal:n_cal + n_sel], teacher_ppl=t_ppl,
        quality=lambda m: t_ppl / heldout_quality(m, held, window),
        tasks=lambda m: task_score(m, tokenizer, eos), cache=cache, blocks=blocks, log=log)


def _gaps(ctx: Context, work: Path) -> dict[int, tuple[Gap, dict[int, Any]]]:
    """Each kept depth's cut (the run of blocks whose plain cut loses least), and every start
    searched for it; a candidate already made keeps the cut it was made with."""
    out: dict[int, tuple[Gap, dict[int, Any]]] = {}
    for k in (int(k) for k in ctx.config["kept"]):
        done = saved(work / "candidates" / f"depth-{k}", candidate_key(ctx.config, k))
        if done is not None:  # resumed: its cut was searched when it was made
            first, last = done["structure"]["dropped"]
            gap = Gap(first, last - first + 1, done["structure"]["angular_distance"])
            searched = {int(a): v for a, v in done["structure"]["searched"].items()}
        else:
            gap, searched = measured_gap(ctx.teacher, ctx.hidden, ctx.total - k,
                                         ctx.select_rows)
        ctx.log(f"K={k}: drop blocks {gap.start}..{gap.start + gap.length - 1} "
                f"({searched[gap.start]})")
        out[k] = (gap, searched)
    ctx.blocks[:] = sorted({g.start - 1 for g, _ in out.values()})
    return out


def _reused(ctx: Context, k: int, gap: Gap, log: Log) -> dict[str, Any] | None:
    cdir = ctx.work / "candidates" / f"depth-{k}"
    done = saved(cdir, candidate_key(ctx.config, k))
    if done is not None:
        log(f"depth-{k}: reusing {cdir} (quality {done['quality']:.3f}, tasks {done['tasks']})")
    return done


