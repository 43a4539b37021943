"""Engines on a real tiny ladder: PyTorch equivalence, sampling, stops, EOS, limits, cancel."""

from __future__ import annotations

import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer

from models.runtime.engine.base import (
    ContextOverflowError,
    GenerationParams,
    StopMatcher,
    VariantLoadError,
)
from models.runtime.engine.genai import GenaiEngine
from models.runtime.engine.ort import OrtEngine
from models.runtime.engine.sampling import select_token
from models.runtime.ladder import load_ladder
from models.runtime.manifest import Manifest

PROMPT = "The json module can"


@pytest.fixture(scope="module")
def manifest(tiny_ladder: Path) -> Manifest:
    return Manifest.load(tiny_ladder)


@pytest.fixture(scope="module")
def tokenizer(tiny_ladder: Path) -> Tokenizer:
    return Tokenizer.from_file(str(tiny_ladder / "tokenizer.json"))


def ort_engine(ladder: Path, manifest: Manifest, tokenizer: Tokenizer, variant: str = "full",
               eos: list[int] | None = None) -> OrtEngine:
    v = manifest.variants[variant]
    return OrtEngine(ladder / v.dir / v.file, tokenizer, manifest.context_length,
                     manifest.eos_token_ids if eos is None else eos, threads=2)


@pytest.fixture(scope="module")
def full(tiny_ladder: Path, manifest: Manifest, tokenizer: Tokenizer) -> OrtEngine:
    return ort_engine(tiny_ladder, manifest, tokenizer)


@pytest.fixture(scope="module")
def varied(random_llama: tuple[Path, Path], tokenizer: Tokenizer) -> OrtEngine:
    """An engine whose continuations vary token to token (for text-level behaviour)."""
    return OrtEngine(random_llama[1] / "model.onnx", tokenizer, 128, [0])


@pytest.fixture(scope="module", params=["optimum", "genai-builder"])
def exported_llama(request: pytest.FixtureRequest) -> tuple[Path, Path]:
    """The same untrained Llama exported by each exporter the build can use."""
    fixture = "random_llama" if request.param == "optimum" else "random_llama_builder"
    return request.getfixturevalue(fixture)  # type: ignore[no-any-return]


@pytest.mark.parametrize("prompt", [PROMPT, "x", "Return a new list of the items in"])
def test_greedy_matches_pytorch_token_for_token(
    exported_llama: tuple[Path, Path], tokenizer: Tokenizer, prompt: str
) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    ckpt, onnx_dir = exported_llama
    engine = OrtEngine(onnx_dir / "model.onnx", tokenizer, 128, [0])
    ids = engine.encode(prompt)
    ours = engine.generate(ids, GenerationParams(max_new_tokens=40, ignore_eos=True)).token_ids
    model = AutoModelForCausalLM.from_pretrained(str(ckpt), dtype=torch.float32)
    with torch.no_grad():
        ref = model.generate(torch.tensor([ids]), max_new_tokens=40, do_sample=False,
                             eos_token_id=None, pad_token_id=0)
    assert ours == ref[0, len(ids):].tolist()
    assert len(set(ours)) > 5  # a varied continuation, so agreement is not by accident


def test_genai_runs_the_same_graph_to_the_same_tokens(
    tiny_ladder: Path, manifest: Manifest, tokenizer: Tokenizer, full: OrtEngine
) -> None:
    genai = GenaiEngine(tiny_ladder / "full", tokenizer, manifest.context_length,
                        manifest.eos_token_ids)
    params = GenerationParams(max_new_tokens=30, ignore_eos=True)
    ids = full.encode(PROMPT)
    assert genai.generate(ids, params).token_ids == full.generate(ids, params).token_ids


@pytest.mark.parametrize("top_k", [0, 512, 10**6])  # none, the whole vocabulary, over it
def test_genai_takes_any_valid_seed_and_top_k(tiny_ladder: Path, manifest: Manifest,
                                              tokenizer: Tokenizer, top_k: int) -> None:
    """The API's seeds span 64 bits and its top_k is unbounded; genai's seed is 32-bit and it
    refuses a top_k over the vocabulary (both raised before)."""
    genai = GenaiEngine(tiny_ladder / "full", tokenizer, manifest.context_length,
                        manifest.eos_token_ids)
    ids = genai.encode(PROMPT)

    def sample(seed: int) -> list[int]:
        params = GenerationParams(max_new_tokens=8, temperature=1.0, top_k=top_k, seed=seed,
                                  ignore_eos=True)
        return genai.generate(ids, params).token_ids

    assert sample(2**63 - 1) == sample(2**63 - 1)
    assert len(sample(2**40)) == 8


def test_batch_generation_with_left_padding_matches_single(varied: OrtEngine) -> None:
    prompts = [varied.encode(PROMPT), varied.encode("Return a new"), varied.encode("x")]
    params = GenerationParams(max_new_tokens=12, ignore_eos=True)
    batched = varied.generate_batch(prompts, params)  # optimum's graph: position_ids input
    for ids, row in zip(prompts, batched, strict=True):
        assert row == varied.generate(ids, params).token_ids


def test_batch_on_a_mask_positioned_graph_needs_equal_lengths(
        random_llama_builder: tuple[Path, Path], tokenizer: Tokenizer) -> None:
    engine = OrtEngine(random_llama_builder[1] / "model.onnx", tokenizer, 128, [0])
    params = GenerationParams(max_new_tokens=12, ignore_eos=True)
    first = engine.encode(PROMPT)
    same = [first, engine.encode("Return a new list of the items in a sequence")[:len(first)]]
    assert len(same[1]) == len(first) and same[1] != first
    for ids, row in zip(same, engine.generate_batch(same, params), strict=True):
        assert row == engine.generate(ids, params).token_ids
    with pytest.raises(ValueError, match="equal length"):
        engine.generate_batch([engine.encode(PROMPT), engine.encode("x")], params)


def test_seeded_sampling_is_reproducible(varied: OrtEngine) -> None:
    ids = varied.encode(PROMPT)
    params = GenerationParams(max_new_tokens=30, temperature=1.0, top_p=0.95, seed=11,
                              ignore_eos=True)
    first = varied.generate(ids, params).token_ids
    assert varied.generate(ids, params).token_ids == first
    other = GenerationParams(max_new_tokens=30, temperature=1.0, top_p=0.95, seed=12,
                             ignore_eos=True)
    assert varied.generate(ids, other).token_ids != first


def test_stop_sequence_ends_generation_and_is_cut(varied: OrtEngine) -> None:
    ids = varied.encode(PROMPT)
    free = varied.generate(ids, GenerationParams(max_new_tokens=40, ignore_eos=True))
    stop = free.text[len(free.text) // 2 :][:3]
    assert stop.strip(), "need a non-blank stop string from the free-running text"
    cut = varied.generate(ids, GenerationParams(max_new_tokens=40, stop=(stop,), ignore_eos=True))
    assert cut.finish_reason == "stop"
    assert cut.text == free.text[: free.text.find(stop)]
    assert len(cut.token_ids) < len(free.token_ids)


def test_streamed_chunks_never_leak_a_stop_prefix(varied: OrtEngine) -> None:
    ids = varied.encode(PROMPT)
    free = varied.generate(ids, GenerationParams(max_new_tokens=40, ignore_eos=True))
    stop = free.text[10:16]
    chunks = list(varied.stream(ids, GenerationParams(max_new_tokens=40, stop=(stop,),
                                                    ignore_eos=True)))
    streamed = "".join(c.text for c in chunks)
    assert stop not in streamed
    assert streamed == free.text[: free.text.find(stop)]
    assert [c.finish_reason for c in chunks][-1] == "stop"
    assert all(c.finish_reason is None for c in chunks[:-1])


def test_eos_ends_generation(varied: OrtEngine, random_llama: tuple[Path, Path],
                             tokenizer: Tokenizer) -> None:
    ids = varied.encode(PROMPT)
    free = varied.generate(ids, GenerationParams(max_new_tokens=20, ignore_eos=True)).token_ids
    eos = free[4]
    engine = OrtEngine(random_llama[1] / "model.onnx", tokenizer, 128, [eos])
    result = engine.generate(ids, GenerationParams(max_new_tokens=20))
    assert result.finish_reason == "stop"
    assert result.token_ids == free[: free.index(eos)]


def test_max_new_tokens_gives_length(varied: OrtEngine) -> None:
    result = varied.generate(PROMPT, GenerationParams(max_new_tokens=7, ignore_eos=True))
    assert result.finish_reason == "length"
    assert len(result.token_ids) == 7


def test_context_overflow_is_rejected_before_any_work(varied: OrtEngine) -> None:
    ids = varied.encode(PROMPT)
    too_many = varied.context_length - len(ids) + 1
    with pytest.raises(ContextOverflowError, match="exceeds the model's context"):
        next(varied.stream(ids, GenerationParams(max_new_tokens=too_many)))
    varied.generate(ids, GenerationParams(max_new_tokens=too_many - 1, ignore_eos=True))


def test_cancel_stops_between_tokens(varied: OrtEngine) -> None:
    cancel = threading.Event()
    chunks = []
    params = GenerationParams(max_new_tokens=50, ignore_eos=True)
    for seen, chunk in enumerate(varied.stream(varied.encode(PROMPT), params, cancel), start=1):
        chunks.append(chunk)
        if seen == 3:
            cancel.set()
    assert chunks[-1].finish_reason == "cancelled"
    assert len(chunks) == 4  # the token in flight when cancel was set, then stop


def test_stop_matcher_holds_back_partial_stop(tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode("abc END def", add_special_tokens=False).ids
    matcher = StopMatcher(tokenizer, ["END"])
    released = ""
    stopped = False
    for i in ids:
        out, stopped = matcher.push(i)
        released += out
        assert "EN" not in released
        if stopped:
            break
    assert stopped and released == "abc "


def test_sampling_top_k_and_top_p() -> None:
    logits = np.array([0.0, 5.0, 4.0, 1.0, -3.0], dtype=np.float32)
    rng = np.random.default_rng(0)
    assert select_token(logits, GenerationParams(), rng) == 1
    two = {select_token(logits, GenerationParams(temperature=5.0, top_k=2), rng)
           for _ in range(200)}
    assert two == {1, 2}
    nucleus = {select_token(logits, GenerationParams(temperature=1.0, top_p=0.5), rng)
               for _ in range(100)}
    assert nucleus == {1}  # p(1) ≈ 0.71 already covers 0.5


@pytest.mark.parametrize("temperature", [5e-324, 1e-310])
def test_a_tiny_temperature_samples_the_top_token(temperature: float) -> None:
    """logits / T overflows to +-inf for a tiny T (inf - inf was NaN, and sampling raised)."""
    logits = np.array([0.0, 5.0, 4.0, 1.0, -3.0], dtype=np.float32)
    rng = np.random.default_rng(0)
    params = GenerationParams(temperature=temperature)
    assert not params.greedy
    assert {select_token(logits, params, rng) for _ in range(20)} == {1}


def test_broken_variant_fails_alone(tiny_ladder: Path, tmp_path: Path) -> None:
    ladder = tmp_path / "ladder"
    shutil.copytree(tiny_ladder, ladder)
    (ladder / "int8" / "model.onnx").write_bytes(b"not an onnx file")
    (ladder / "distilled" / "model.onnx").unlink()
    loaded = load_ladder(ladder, runtime="onnxruntime", warmup=False)
    assert {"full", "distilled-int8"} <= set(loaded.engines)
    assert set(loaded.failed) == {"int8", "distilled"}
    assert "not found" in loaded.failed["distilled"]
    assert "cannot load" in loaded.failed["int8"]
    assert all("\n" not in msg for msg in loaded.failed.values())


def test_rungs_run_on_the_threads_the_build_measured_unless_told(tiny_ladder: Path,
                                                                 tmp_path: Path) -> None:
    from models.runtime.manifest import Manifest

    ladder = tmp_path / "ladder"
    shutil.copytree(tiny_ladder, ladder)
    m = Manifest.load(ladder)
    for name, info in m.variants.items():
        info.serve_threads = 1 if name == "int8" else None
    m.save(ladder)
    only = ["full", "int8"]
    measured = load_ladder(ladder, threads=2, runtime="onnxruntime", warmup=False, only=only)
    assert {n: e.threads for n, e in measured.engines.items()} == {"full": 2, "int8": 1}
    told = load_ladder(ladder, threads=2, runtime="onnxruntime", warmup=False, only=only,
                       variant_threads={})
    assert {n: e.threads for n, e in told.engines.items()} == {"full": 2, "int8": 2}


def test_missing_manifest_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(VariantLoadError, match="build the ladder first"):
        load_ladder(tmp_path)


@pytest.mark.parametrize("runtime", ["onnxruntime", "onnxruntime-genai"])
def test_every_variant_generates(tiny_ladder: Path, runtime: str) -> None:
    """Under either runtime; but onnxruntime-genai cannot load greenroute's own operator, so a
    variant the race put on it fails there with a message that says what to run instead
    (under ``auto`` it runs on our engine: test_auto_runs_our_operator_on_our_engine)."""
    from models.runtime import kernels
    from models.runtime.manifest import Manifest

    ours = {n for n, v in Manifest.load(tiny_ladder).variants.items()
            if kernels.uses_kernels(v.quantization)}
    loaded = load_ladder(tiny_ladder, runtime=runtime)
    if runtime == "onnxruntime-genai":
        assert set(loaded.failed) == ours
        assert all("--runtime onnxruntime" in why for why in loaded.failed.values())
    else:
        assert not loaded.failed
    for engine in loaded.engines.values():
        assert engine.runtime == runtime
        out = engine.generate(PROMPT, GenerationParams(max_new_tokens=5, ignore_eos=True))
        assert len(out.token_ids) == 5


@pytest.mark.parametrize(("requested", "quantization", "shares_kv", "want"), [
    ("auto", "rowquant-int8-a16", False, "onnxruntime"),  # genai cannot load our operator
    ("auto", "matmulnbits-int8-block64", False, "onnxruntime-genai"),  # the build's choice
    ("auto", "matmulnbits-int8-block64", True, "onnxruntime"),  # ours batches shared KV
    ("auto", None, False, "onnxruntime-genai"),
    ("onnxruntime-genai", "rowquant-int8", False, "onnxruntime-genai"),  # asked: fails clearly
    ("onnxruntime", None, False, "onnxruntime"),
])
def test_auto_runs_our_operator_on_our_engine(requested: str, quantization: str | None,
                                              shares_kv: bool, want: str) -> None:
    from models.runtime.ladder import runtime_for

    assert runtime_for(requested, "onnxruntime-genai", quantization, lambda: shares_kv) == want


def test_a_session_cannot_leave_the_process_pool(monkeypatch: pytest.MonkeyPatch) -> None:
    """onnxruntime refuses a per-session pool once the global one exists: say so plainly."""
    import models.runtime.engine.session as ort_engine

    monkeypatch.setattr(ort_engine, "_global_pool_threads", 2)
    assert ort_engine.session_options(2).use_per_session_threads is False
    with pytest.raises(ValueError, match="shares one pool of 2 threads"):
        ort_engine.session_options(1)
    monkeypatch.setattr(ort_engine, "_global_pool_threads", None)
    so = ort_engine.session_options(3)
    assert so.intra_op_num_threads == 3
    # its own pool spins, for a bounded time, when idle
    assert so.get_session_config_entry("session.intra_op.allow_spinning") == "1"
    assert so.get_session_config_entry("session.intra_op.spin_duration_us") == str(
        ort_engine.SPIN_US)
    assert 0 < ort_engine.SPIN_US <= 10_000


@pytest.mark.parametrize(("shape", "dtype"), [((1, 3, 160, 64), np.float32), ((5,), np.int64),
                                              ((2, 1, 49152), np.float16), ((1, 1), np.int64)])
def test_aligned_zeros_start_on_a_cache_line(shape: tuple[int, ...], dtype: type) -> None:
    from models.runtime.engine.session import aligned_zeros

    arrays = [aligned_zeros(shape, dtype) for _ in range(8)]  # numpy alone: 16-byte offsets
    for a in arrays:
        assert a.ctypes.data % 64 == 0
        assert a.shape == shape and a.dtype == dtype and a.flags.c_contiguous
        assert not a.any()
        a[...] = 1  # writable, and its own memory: the others stay zero
    assert all(int(np.count_nonzero(a == 1)) == a.size for a in arrays)


def test_batch_buffers_are_aligned(tiny_ladder: Path) -> None:
    """Every buffer a step binds from numpy starts on a cache line (see ``aligned_zeros``)."""
    from models.runtime.engine.slots import KVSlots

    engine = load_ladder(tiny_ladder, runtime="onnxruntime", only=["full"]).engines["full"]
    assert isinstance(engine, OrtEngine) and engine.shared_kv
    slots = KVSlots(engine, 3, 40)
    for a in (*slots._kv, slots.mask, slots._ids, slots._logits):
        assert a.ctypes.data % 64 == 0
