"""Tiny random checkpoints of many causal-LM architectures, saved as a user would save theirs
(``AutoModelForCausalLM.from_config(...).save_pretrained``) with a tiny BPE tokenizer beside them.

Each is 2 blocks of width 64 over a 320-token vocabulary: made in well under a second, exported
in seconds. Weights are widely spread (``initializer_range=0.15``) so greedy continuations vary
and a wrong graph cannot match PyTorch's tokens by accident.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # ids 0, 1, 2
ENDOFTEXT, IM_START, IM_END = range(3)
VOCAB = 320
CONTEXT = 256
CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + "
          "message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
_LLAMA_LIKE = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
               "num_attention_heads": 4, "num_key_value_heads": 2,
               "max_position_embeddings": CONTEXT, "tie_word_embeddings": False}


@dataclass(frozen=True)
class Arch:
    """One row of the matrix: a transformers config class, its arguments, and whether the
    checkpoint carries a chat template (the others get the plain fallback)."""

    name: str
    config_class: str
    config: dict[str, Any] = field(default_factory=dict)
    chat_template: bool = True


ARCHS = [
    Arch("llama", "LlamaConfig", _LLAMA_LIKE),
    Arch("mistral", "MistralConfig", {**_LLAMA_LIKE, "sliding_window": None}),
    Arch("qwen2", "Qwen2Config", _LLAMA_LIKE),
    Arch("qwen3", "Qwen3Config", {**_LLAMA_LIKE, "head_dim": 16}, chat_template=False),
    Arch("phi3", "Phi3Config", {**_LLAMA_LIKE, "original_max_position_embeddings": CONTEXT,
                                "pad_token_id": ENDOFTEXT}),
    Arch("gemma2", "Gemma2Config", {**_LLAMA_LIKE, "head_dim": 16, "sliding_window": 128,
                                    "query_pre_attn_scalar": 16}),
    Arch("gemma3", "Gemma3TextConfig", {**_LLAMA_LIKE, "head_dim": 16, "sliding_window": 128,
                                        "query_pre_attn_scalar": 16}),
    Arch("gpt2", "GPT2Config", {"n_embd": 64, "n_layer": 2, "n_head": 4, "n_positions": CONTEXT,
                                "tie_word_embeddings": True}, chat_template=False),
    Arch("gpt_neox", "GPTNeoXConfig", {"hidden_size": 64, "intermediate_size": 128,
                                       "num_hidden_layers": 2, "num_attention_heads": 4,
                                       "max_position_embeddings": CONTEXT,
                                       "tie_word_embeddings": False}),
    Arch("olmo", "OlmoConfig", _LLAMA_LIKE),
]
UNSUPPORTED = Arch("mamba", "MambaConfig", {"hidden_size": 64, "num_hidden_layers": 2,
                                            "state_size": 4})


@functools.cache
def tokenizer_json(corpus: Path) -> str:
    """A 320-token byte-level BPE with ChatML's special tokens (trained in well under a second)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, min_frequency=2, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator([corpus.read_text(encoding="utf-8")], trainer)
    assert tok.get_vocab_size() == VOCAB
    return str(tok.to_str())


def save_tokenizer(out: Path, corpus: Path, chat_template: bool) -> None:
    """``tokenizer.json`` + ``tokenizer_config.json`` (EOS ``<|im_end|>`` with the ChatML
    template, ``<|endoftext|>`` without one), as ``PreTrainedTokenizerFast`` saves them."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(tokenizer_json(corpus)),
        bos_token=SPECIALS[IM_START if chat_template else ENDOFTEXT],
        eos_token=SPECIALS[IM_END if chat_template else ENDOFTEXT],
        pad_token=SPECIALS[ENDOFTEXT], model_max_length=CONTEXT)
    if chat_template:
        fast.chat_template = CHATML
    fast.save_pretrained(str(out))


def make_checkpoint(arch: Arch, out: Path, corpus: Path, seed: int = 0) -> Path:
    """Save a random ``arch`` model and its tokenizer in ``out``; return ``out``."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    eos = IM_END if arch.chat_template else ENDOFTEXT
    config = getattr(transformers, arch.config_class)(
        vocab_size=VOCAB, initializer_range=0.15, bos_token_id=IM_START, eos_token_id=eos,
        **arch.config)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # norm gains away from 1.0: a norm lost in export changes the output
        for name, param in model.named_parameters():
            if "norm" in name and param.ndim == 1:
                param.copy_(param + 0.3 * torch.randn_like(param))
    model.save_pretrained(str(out), safe_serialization=True)
    save_tokenizer(out, corpus, arch.chat_template)
    return out


def greedy_tokens(checkpoint: Path, prompt_ids: list[int], new_tokens: int,
                  eos_ids: list[int]) -> list[int]:
    """PyTorch's greedy continuation, ending with the first EOS id when one comes: the reference
    the served tokens must equal."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(checkpoint), dtype=torch.float32).eval()
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt_ids]), attention_mask=torch.ones(
            1, len(prompt_ids), dtype=torch.long), max_new_tokens=new_tokens, do_sample=False,
            eos_token_id=eos_ids or None, pad_token_id=ENDOFTEXT)
    tokens = [int(t) for t in out[0, len(prompt_ids):]]
    for i, token in enumerate(tokens):
        if token in eos_ids:
            return tokens[: i + 1]
    return tokens


def architecture(checkpoint: Path) -> str:
    return str(json.loads((checkpoint / "config.json").read_text())["architectures"][0])
