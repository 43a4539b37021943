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
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from models.build.train.distil import _pack
from models.build.train.heal import (
    TeacherCache,
    bridge_student,
    calibration_states,
    heal,
    load_cache,
    save_cache,
    teacher_pass,
)
from models.build.train.prune import Gap, gap_distances
from models.build.train.student import (
    STUDENT_FILE,
    STUDENT_META,
    load_candidate,
    shared_names,
    student_from_picks,
)

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


def mean_ce(model: Any, rows: np.ndarray) -> float:
    """Mean next-token cross-entropy of ``model`` on ``rows`` (``[N, S + 1]`` token ids)."""
    import torch
    import torch.nn.functional as F  # noqa: N812

    with torch.no_grad():
        logits = model(input_ids=torch.from_numpy(rows[:, :-1])).logits.float()
        return float(F.cross_entropy(logits.flatten(0, 1),
                                     torch.from_numpy(rows[:, 1:]).flatten()))


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
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from models.build.pipeline.options import DEFAULT_HELDOUT

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
    eos = int(tokenizer.convert_tokens_to_ids("<|im_end|>"))
    total = int(teacher.config.num_hidden_layers)
    rows = _rows(teacher, tokenizer, config["data"], seed, work, log)
    n_cal, n_sel = int(config["data"]["calibration_rows"]), int(config["data"]["selection_rows"])
    hidden, mlp = calibration_states(teacher, rows[:n_cal])
    select_rows = rows[n_cal:n_cal + n_sel]  # where cuts and bridges are judged
    gaps: dict[int, Gap] = {}
    searched: dict[int, Any] = {}
    reused: dict[int, dict[str, Any]] = {}  # candidates a run with this config already made
    for k in (int(k) for k in config["kept"]):
        done = _saved(work / "candidates" / f"depth-{k}", candidate_key(config, k))
        if done is not None:  # resumed: its cut was searched when it was made
            reused[k] = done
            first, last = done["structure"]["dropped"]
            gaps[k] = Gap(first, last - first + 1, done["structure"]["angular_distance"])
            searched[k] = {int(a): v for a, v in done["structure"]["searched"].items()}
        else:
            gaps[k], searched[k] = measured_gap(teacher, hidden, total - k, select_rows)
        log(f"K={k}: drop blocks {gaps[k].start}..{gaps[k].start + gaps[k].length - 1} "
            f"({searched[k][gaps[k].start]})")
    blocks = sorted({g.start - 1 for g in gaps.values()})
    k_top = int(config["heal"]["top_k"])
    cached: list[TeacherCache] = []

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

    held = tokenizer(DEFAULT_HELDOUT.read_text(encoding="utf-8"),
                     add_special_tokens=False)["input_ids"][: int(config["eval"]["tokens"])]
    window = int(config["eval"]["window"])
    t_ppl = heldout_quality(teacher, held, window)

    def measure(student: Any) -> tuple[float, int]:
        return t_ppl / heldout_quality(student, held, window), task_score(student, tokenizer,
                                                                          eos)

    cands: list[dict[str, Any]] = []
    for k, gap in gaps.items():
        name, key = f"depth-{k}", candidate_key(config, k)
        cdir = work / "candidates" / name
        if k in reused:
            done = reused[k]
            log(f"{name}: reusing {cdir} (quality {done['quality']:.3f}, tasks {done['tasks']})")
            cands.append(done)
            continue
        student = student_from_picks(teacher, gap.kept(total)).eval()
        plain_q = t_ppl / heldout_quality(student, held, window)
        plain_ce = mean_ce(student, select_rows)
        down = student.model.layers[gap.start - 1].mlp.down_proj.weight  # the bridge's home
        before = down.detach().clone()
        errors = bridge_student(student, gap, hidden, mlp, float(config["bridge"]["ridge"]))
        bridged_ce = mean_ce(student, select_rows)
        if bridged_ce >= plain_ce:  # the bridge must earn its place on text it was not fit on
            with torch.no_grad():
                down.copy_(before)
        errors.update(kept=bridged_ce < plain_ce, ce_plain_cut=plain_ce, ce_bridged=bridged_ce)
        bridged_q = t_ppl / heldout_quality(student, held, window)
        log(f"{name}: quality plain cut {plain_q:.3f}, with bridge {bridged_q:.3f} {errors}")
        record = heal(student, gap.start - 1, cache(), {**config["heal"], "seed": seed},
                      float(config["heal"]["seconds"]), log)
        quality, tasks = measure(student)
        log(f"{name}: healed quality {quality:.3f}, tasks {tasks}/60")
        cand = {"name": name, "key": key, "layers": k, "teacher_blocks": gap.kept(total),
                "structure": {
                    "kind": "depth", "dropped": [gap.start, gap.start + gap.length - 1],
                    "angular_distance": round(gap.distance, 4), "bridge": "least squares, "
                    f"folded into block {gap.start - 1}'s down_proj", "bridge_fit": errors,
                    "searched": searched[k]},
                "quality_plain_cut": plain_q, "quality_bridged": bridged_q,
                "quality": quality, "tasks": tasks,
                "healing": {k2: v for k2, v in record.items() if k2 != "curve"},
                "curve": record["curve"]}
        cands.append(_save(student, cand, cdir, record["trained_blocks"]))
    pick = choose(cands, config["select"])
    if "finish" in config:
        finished = finish(teacher, pick, config, work, cache, measure, log)
        cands.append(finished)
        pick = choose([finished, pick], config["select"])  # a tie goes to the finished one
    out.mkdir(parents=True, exist_ok=True)
    src = work / "candidates" / pick["name"]
    shutil.copy2(src / STUDENT_FILE, out / STUDENT_FILE)
    summary = {**pick, "teacher_quality_ppl": t_ppl, "rule": choose.__doc__,
               "rows": int(rows.shape[0]), "seq_len": int(rows.shape[1] - 1),
               "wall_seconds": round(time.monotonic() - started, 1),
               "candidates": [{k2: v for k2, v in c.items()
                               if k2 not in ("curve", "finish_curve", "shared")}
                              for c in cands],
               "config": config}
    (out / STUDENT_META).write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def finish(teacher: Any, pick: dict[str, Any], config: dict[str, Any], work: Path,
           cache: Callable[[], TeacherCache], measure: Callable[[Any], tuple[float, int]],
           log: Log) -> dict[str, Any]:
    """The second healing phase (``config["finish"]``) of the chosen candidate alone, from its
    saved tensors; saved as ``<name>-finished`` (reused when a run with this config made it)."""
    seed = int(config["seed"])
    fin_cfg = {**config["heal"], **config["finish"], "seed": seed + 1}
    name, key = f"{pick['name']}-finished", candidate_key(config, pick["layers"], True)
    cdir = work / "candidates" / name
    done = _saved(cdir, key)
    if done is not None:
        log(f"{name}: reusing {cdir}")
        return done
    student = load_candidate(teacher, work / "candidates" / pick["name"])
    first = int(pick["healing"]["trained_blocks"][0])
    record = heal(student, first, cache(), fin_cfg, float(fin_cfg["seconds"]), log)
    quality, tasks = measure(student)
    log(f"{name}: quality {quality:.3f}, tasks {tasks}/60")
    return _save(student, {**pick, "name": name, "key": key, "quality": quality,
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


def _saved(cdir: Path, key: str) -> dict[str, Any] | None:
    meta = cdir / STUDENT_META
    if not (meta.is_file() and (cdir / STUDENT_FILE).is_file()):
        return None
    cand = json.loads(meta.read_text())
    return cand if cand.get("key") == key else None


def _save(student: Any, cand: dict[str, Any], cdir: Path, trained: list[int]) -> dict[str, Any]:
    """Write the tensors training changed (fp16) and the candidate's record to ``cdir``."""
    import torch
    from safetensors.torch import save_file

    cdir.mkdir(parents=True, exist_ok=True)
    shared = shared_names(student)
    own = {key: v.detach().to(torch.float16).contiguous()
           for key, v in student.state_dict().items()
           if key not in shared and _trained(key, *trained)}
    save_file(own, str(cdir / STUDENT_FILE), metadata={"format": "pt"})
    cand = {**cand, "shared": sorted(shared)}
    (cdir / STUDENT_META).write_text(json.dumps(cand, indent=2) + "\n")
    return cand


def _trained(key: str, first: int, last: int) -> bool:
    """True for the tensors healing trains: blocks ``first..last`` and the final norm."""
    from models.build.train.student import _BLOCK

    m = _BLOCK.search(key)
    return first <= int(m.group(2)) <= last if m else key.endswith("norm.weight")
