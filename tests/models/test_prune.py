"""Depth pruning: the gap search, the least-squares bridge and its folding, the cached-prefix
forward healing trains through, and rebuilding a student from the teacher plus its own tensors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from models.build.train.prune import (
    Gap,
    angular_distance,
    fit_bridge,
    fold_bridge,
    gap_distances,
    residual_error,
)
from models.build.train.students import choose

torch = pytest.importorskip("torch")


def test_angular_distance_is_zero_same_way_half_orthogonal_one_opposite() -> None:
    a = np.array([[1.0, 0.0], [0.0, 2.0]])
    assert angular_distance(a, 3 * a) == pytest.approx(0.0, abs=1e-6)
    assert angular_distance(a, a[:, ::-1]) == pytest.approx(0.5)
    assert angular_distance(a, -a) == pytest.approx(1.0)


def test_gap_distances_find_the_run_that_changes_the_stream_least_and_keep_the_ends() -> None:
    rng = np.random.default_rng(0)
    hidden = [rng.normal(size=(50, 8)) for _ in range(8)]  # inputs of 8 blocks
    hidden[4] = hidden[2] + 0.01 * rng.normal(size=(50, 8))  # blocks 2 and 3 do ~nothing
    dist = gap_distances(hidden, 2)
    assert min(dist, key=dist.__getitem__) == 2
    assert Gap(2, 2, dist[2]).kept(8) == [0, 1, 4, 5, 6, 7]
    assert set(dist) == {1, 2, 3, 4, 5}  # never block 0, never block 7
    hidden[1] = hidden[0]  # block 0 does nothing, but the first block is always kept
    assert 0 not in gap_distances(hidden, 1)
    with pytest.raises(ValueError, match="1 to 6"):
        gap_distances(hidden, 7)


def test_bridge_recovers_a_linear_map_and_never_fits_worse_than_the_plain_cut() -> None:
    rng = np.random.default_rng(1)
    m = rng.normal(size=(400, 6)).astype(np.float32)
    r = rng.normal(size=(400, 6)).astype(np.float32)
    true = rng.normal(size=(6, 6)).astype(np.float32)
    target = r + m @ true
    t = fit_bridge(m, r, target, ridge=0.0)
    np.testing.assert_allclose(t, true, atol=1e-4)
    noisy = target + rng.normal(size=target.shape).astype(np.float32)
    t = fit_bridge(m, r, noisy, ridge=1e-3)
    assert residual_error(m, r, noisy, t) < residual_error(m, r, noisy, None)
    # an enormous ridge keeps the identity: the plain cut
    np.testing.assert_allclose(fit_bridge(m, r, noisy, ridge=1e9), np.eye(6), atol=1e-5)


def test_folded_down_proj_outputs_the_old_output_times_the_bridge() -> None:
    rng = np.random.default_rng(2)
    w = rng.normal(size=(6, 10)).astype(np.float32)  # Linear(10 -> 6).weight
    t = rng.normal(size=(6, 6)).astype(np.float32)
    z = rng.normal(size=(5, 10)).astype(np.float32)
    np.testing.assert_allclose(z @ fold_bridge(w, t).T, (z @ w.T) @ t, rtol=1e-4, atol=1e-4)


def _tiny_llama(layers: int = 6) -> object:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(3)
    cfg = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=64, tie_word_embeddings=True,
                      attn_implementation="sdpa")
    return LlamaForCausalLM(cfg).eval()


def test_training_forward_from_the_cached_prefix_equals_the_whole_model() -> None:
    from models.build.train.heal import forward_from, teacher_pass
    from models.build.train.student import student_from_picks

    teacher = _tiny_llama()
    student = student_from_picks(teacher, [0, 1, 2, 5]).eval()
    rows = np.random.default_rng(4).integers(0, 97, size=(3, 17))
    cache = teacher_pass(teacher, rows, [2], k=5, batch=2)
    # student blocks 0 and 1 are the teacher's: the teacher's input to block 2 is the student's
    with torch.no_grad():
        whole = student(input_ids=torch.from_numpy(rows[:, :-1])).logits
        part = forward_from(student, 2, torch.from_numpy(cache.hidden[2].astype(np.float32)))
    np.testing.assert_allclose(part.numpy(), whole.numpy(), atol=2e-2)  # fp16 cache
    # the teacher's cached top-k are its own most likely tokens, most likely first
    with torch.no_grad():
        probs = torch.softmax(teacher(input_ids=torch.from_numpy(rows[:, :-1])).logits, -1)
    np.testing.assert_array_equal(cache.top_i[..., 0], probs.argmax(-1).numpy())
    assert np.all(np.diff(cache.top_p.astype(np.float32), axis=-1) <= 1e-3)


def test_bridged_student_tracks_the_teacher_better_and_healing_lowers_its_loss() -> None:
    from models.build.train.heal import (
        bridge_student,
        calibration_states,
        heal,
        teacher_pass,
    )
    from models.build.train.student import student_from_picks

    teacher = _tiny_llama()
    rows = np.random.default_rng(5).integers(0, 97, size=(24, 17))
    hidden, mlp = calibration_states(teacher, rows)
    assert len(hidden) == 6 and hidden[0].shape == (24 * 16, 32)
    np.testing.assert_allclose(hidden[3] - mlp[2] + mlp[2], hidden[3])
    gap = Gap(start=2, length=2, distance=0.0)
    student = student_from_picks(teacher, gap.kept(6)).eval()
    errors = bridge_student(student, gap, hidden, mlp, ridge=1e-4)
    assert errors["error_bridged"] < errors["error_plain_cut"]
    cache = teacher_pass(teacher, rows, [1], k=8)
    cfg = {"seed": 0, "lr": 3e-3, "batch_size": 4, "steps": 40, "warmup_steps": 2,
           "ce_weight": 0.0, "log_every": 39, "train_blocks": 2}
    last_before = student.model.layers[3].mlp.up_proj.weight.clone()
    rec = heal(student, 1, cache, cfg, seconds=1e9, log=lambda _m: None)  # steps bound it
    assert rec["steps"] == 40 and rec["tokens"] == 40 * 4 * 16
    assert rec["trained_blocks"] == [1, 2]
    assert torch.equal(student.model.layers[3].mlp.up_proj.weight, last_before)  # not trained
    assert rec["curve"][-1]["kd"] < rec["curve"][0]["kd"]
    # block 0 is below the first trained block: still the teacher's
    assert torch.equal(student.model.layers[0].mlp.up_proj.weight,
                       teacher.model.layers[0].mlp.up_proj.weight)
    # the bf16 forward (autocast) trains too; the weights it updates stay fp32
    before = student.model.layers[1].mlp.up_proj.weight.clone()
    rec = heal(student, 1, cache, {**cfg, "steps": 3, "precision": "bf16"}, seconds=1e9,
               log=lambda _m: None)
    assert rec["precision"] == "bf16" and rec["steps"] == 3
    weight = student.model.layers[1].mlp.up_proj.weight
    assert weight.dtype == torch.float32 and not torch.equal(weight, before)


def test_student_rebuilt_from_teacher_and_its_own_tensors_equals_it(tmp_path: Path) -> None:
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    from models.build.train.candidates import trained_tensor
    from models.build.train.student import (
        STUDENT_META,
        assemble_student,
        shared_names,
        student_from_picks,
    )

    teacher = _tiny_llama()
    teacher.save_pretrained(tmp_path / "teacher")
    kept = [0, 1, 4, 5]
    student = student_from_picks(teacher, kept)
    with torch.no_grad():  # "healing" moved the blocks from student block 1 up
        for layer in student.model.layers[1:]:
            layer.mlp.down_proj.weight.mul_(1.5)
    shared = shared_names(student)
    own = {k: v.half() for k, v in student.state_dict().items()
           if k not in shared and trained_tensor(k, 1, 3)}
    assert not any(".layers.0." in k for k in own) and "model.norm.weight" in own
    (tmp_path / "s").mkdir()
    save_file(own, str(tmp_path / "s" / "student.safetensors"))
    (tmp_path / "s" / STUDENT_META).write_text(json.dumps(
        {"layers": 4, "teacher_blocks": kept, "shared": sorted(shared)}))
    rebuilt = AutoModelForCausalLM.from_pretrained(
        str(assemble_student(tmp_path / "teacher", tmp_path / "s", tmp_path / "out")))
    for key, value in student.state_dict().items():
        want = value.half().float() if key in own else value
        assert torch.equal(rebuilt.state_dict()[key], want), key


def test_choice_is_the_smallest_student_meeting_both_floors_else_the_best_answers() -> None:
    c = [{"name": "a", "layers": 24, "quality": 0.9, "tasks": 30},
         {"name": "b", "layers": 20, "quality": 0.82, "tasks": 25},
         {"name": "c", "layers": 16, "quality": 0.7, "tasks": 20}]
    assert choose(c, {"quality": 0.8, "tasks": 24})["name"] == "b"
    twin = {**c[1], "name": "b2"}  # equal on every count: the first listed wins
    assert choose([twin, c[1]], {"quality": 0.99, "tasks": 99})["name"] == "b2"
    assert choose(c, {"quality": 0.95, "tasks": 24})["name"] == "a"
    c[2]["tasks"] = 31
    assert choose(c, {"quality": 0.95, "tasks": 24})["name"] == "c"


def test_a_build_assembles_saved_student_blocks_and_records_how_they_were_made(
        tmp_path: Path, tiny_teacher: Path, tiny_texts: tuple[Path, Path]) -> None:
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    from models.build.pipeline.build import prepare, resolve_sources
    from models.build.train.student import (
        STUDENT_FILE,
        STUDENT_META,
        shared_names,
        student_from_picks,
    )
    from tests.conftest import tiny_build_options

    teacher = AutoModelForCausalLM.from_pretrained(str(tiny_teacher))
    student = student_from_picks(teacher, [1])  # the teacher's second block alone
    with torch.no_grad():
        student.model.norm.weight.mul_(2.0)  # "healed": only the final norm moved
    sdir = tmp_path / "student"
    sdir.mkdir()
    save_file({"model.norm.weight": student.model.norm.weight.detach().half()},
              str(sdir / STUDENT_FILE))
    record = {"name": "depth-1", "layers": 1, "teacher_blocks": [1],
              "shared": sorted(shared_names(student)), "structure": {"kind": "depth"},
              "healing": {"tokens": 123, "seconds": 4.5}, "curve": [{"step": 1}]}
    (sdir / STUDENT_META).write_text(json.dumps(record))
    opts = tiny_build_options(tiny_teacher, sdir, tmp_path / "ladder", tiny_texts[1])
    b = prepare(opts, resolve_sources(opts), tmp_path / "staging", lambda _m: None)
    assert b.student_made == {k: record[k] for k in
                              ("name", "layers", "teacher_blocks", "structure", "healing")}
    rebuilt = AutoModelForCausalLM.from_pretrained(str(b.sources["distilled"][1]))
    assert rebuilt.config.num_hidden_layers == 1
    assert torch.equal(rebuilt.model.layers[0].mlp.up_proj.weight,
                       teacher.model.layers[1].mlp.up_proj.weight)  # from the teacher
    assert torch.equal(rebuilt.model.norm.weight, student.model.norm.weight.half().float())


def test_measured_gap_tries_every_allowed_run_and_keeps_the_one_that_loses_least() -> None:
    from models.build.train.candidates import mean_ce
    from models.build.train.heal import calibration_states
    from models.build.train.student import student_from_picks
    from models.build.train.students import measured_gap

    teacher = _tiny_llama()
    rows = np.random.default_rng(6).integers(0, 97, size=(4, 13))
    hidden, _ = calibration_states(teacher, rows)
    gap, scores = measured_gap(teacher, hidden, 2, rows)
    assert sorted(scores) == [1, 2, 3]  # starts 1..3: block 0 and block 5 stay
    assert scores[gap.start]["ce"] == min(s["ce"] for s in scores.values())
    cut = student_from_picks(teacher, gap.kept(6))
    assert mean_ce(cut, rows) == pytest.approx(scores[gap.start]["ce"], abs=1e-3)
    assert mean_ce(teacher, rows) != pytest.approx(scores[gap.start]["ce"], abs=1e-3)


def test_saved_candidate_reloads_as_it_was_and_a_changed_config_does_not_reuse_it(
        tmp_path: Path) -> None:
    from models.build.train.candidates import candidate_key, save, saved
    from models.build.train.student import load_candidate, student_from_picks

    teacher = _tiny_llama()
    student = student_from_picks(teacher, [0, 1, 4, 5])
    with torch.no_grad():
        student.model.layers[2].self_attn.q_proj.weight.add_(0.25)
    cfg = {"seed": 1, "data": {"rows": 4}, "bridge": {"ridge": 0.1}, "heal": {"lr": 1e-3},
           "eval": {"tokens": 8}, "finish": {"seconds": 5}}
    key = candidate_key(cfg, 4)
    save(student, {"name": "c", "key": key, "layers": 4, "teacher_blocks": [0, 1, 4, 5]},
         tmp_path / "c", [1, 3])
    back = load_candidate(teacher, tmp_path / "c")
    for name, value in student.state_dict().items():  # trained tensors round-trip via fp16
        np.testing.assert_allclose(back.state_dict()[name].numpy(), value.numpy(), atol=2e-3)
    assert saved(tmp_path / "c", key) is not None
    assert saved(tmp_path / "c", candidate_key({**cfg, "heal": {"lr": 2e-3}}, 4)) is None
    assert saved(tmp_path / "c", candidate_key(cfg, 3)) is None
    # the finishing phase's settings only key the finished candidate
    assert candidate_key({**cfg, "finish": {"seconds": 9}}, 4) == key
    assert candidate_key({**cfg, "finish": {"seconds": 9}}, 4, True) != candidate_key(
        cfg, 4, True)


def test_teacher_pass_kept_on_disk_is_read_back_only_for_the_same_rows(tmp_path: Path) -> None:
    from models.build.train.heal import load_cache, precision, save_cache, teacher_pass

    teacher = _tiny_llama()
    rows = np.random.default_rng(2).integers(0, 97, size=(6, 9))
    cache = teacher_pass(teacher, rows, [1, 2], k=4)
    save_cache(cache, tmp_path / "t")
    back = load_cache(tmp_path / "t", rows, [1, 2], 4)
    assert back is not None
    np.testing.assert_array_equal(back.hidden[2], cache.hidden[2])
    np.testing.assert_array_equal(back.top_i, cache.top_i)
    assert load_cache(tmp_path / "t", rows[::-1].copy(), [1, 2], 4) is None
    assert load_cache(tmp_path / "t", rows, [1, 2], 8) is None
    assert load_cache(tmp_path / "t", rows, [3], 4) is None  # a block it never kept
    assert precision("fp32") == "fp32" and precision("auto") in ("fp32", "bf16")
    with pytest.raises(ValueError, match="precision"):
        precision("fp8")


def test_finish_heals_the_pick_again_from_its_saved_tensors_and_is_reused_after(
        tmp_path: Path) -> None:
    from models.build.train.candidates import Context, candidate_key, finish, save
    from models.build.train.heal import teacher_pass
    from models.build.train.student import student_from_picks

    teacher = _tiny_llama()
    rows = np.random.default_rng(3).integers(0, 97, size=(8, 17))
    kept = [0, 1, 4, 5]
    cfg = {"seed": 0, "data": {}, "bridge": {}, "eval": {},
           "heal": {"lr": 3e-3, "batch_size": 4, "steps": 6, "warmup_steps": 1, "ce_weight": 0.0,
                    "log_every": 5, "train_blocks": 2, "top_k": 8},
           "finish": {"steps": 4, "seconds": 1e9}}
    pick = save(student_from_picks(teacher, kept),
                {"name": "depth-4", "key": candidate_key(cfg, 4), "layers": 4,
                 "teacher_blocks": kept, "quality": 0.5, "tasks": 3,
                 "healing": {"trained_blocks": [1, 2]}},
                tmp_path / "candidates" / "depth-4", [1, 2])
    caches: list[int] = []

    def cache():  # type: ignore[no-untyped-def]
        caches.append(1)
        return teacher_pass(teacher, rows, [1], k=8)

    seen: list[Any] = []

    def ctx(quality: float, tasks: int) -> Context:
        return Context(teacher=teacher, config=cfg, work=tmp_path, total=6, hidden=[],
                       mlp=None, select_rows=rows, teacher_ppl=1.0,
                       quality=lambda s: (seen.append(s), quality)[1], tasks=lambda _s: tasks,
                       cache=cache, blocks=[1], log=lambda _m: None)

    done = finish(ctx(0.6, 4), pick)
    assert done["name"] == "depth-4-finished" and done["finish"]["steps"] == 4
    assert (done["quality"], done["tasks"]) == (0.6, 4)
    assert (done["quality_first_phase"], done["tasks_first_phase"]) == (0.5, 3)
    moved = seen[0].model.layers[1].mlp.up_proj.weight  # trained from the saved candidate on
    assert not torch.equal(moved, teacher.model.layers[1].mlp.up_proj.weight)
    assert torch.equal(seen[0].model.layers[3].mlp.up_proj.weight,  # above train_blocks
                       teacher.model.layers[5].mlp.up_proj.weight)
    assert choose([done, pick], {"quality": 0.9, "tasks": 50})["name"] == "depth-4-finished"
    again = finish(ctx(0.0, 0), pick)
    assert again["quality"] == 0.6 and caches == [1]  # reused: no teacher pass, no healing
