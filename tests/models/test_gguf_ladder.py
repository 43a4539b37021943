"""A user's GGUF file becomes a served ladder: ``greenroute build --model FILE.gguf`` on tiny
GGUFs written here (a Q4_0 Llama with a ChatML template in its metadata, a Q8_0 Qwen2 with
none), served by the real app, answering the greedy tokens of the dequantized checkpoint and
rendering chats with the GGUF's own template (or the documented fallback)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from app.main import create_app
from app.settings import Settings
from cli.main import main as cli_main
from models.build.pipeline.export import GENAI_BUILDER, OPTIMUM
from models.build.pipeline.source import resolve_checkpoint
from models.runtime.chat import FALLBACK_TEMPLATE
from models.runtime.manifest import Manifest
from tests.app.conftest import wait_ready
from tests.conftest import genai_builder_python
from tests.models.byo import greedy_tokens
from tests.models.test_gguf_source import (
    ARCH,
    CHATML,
    ENDOFTEXT,
    IM_END,
    IM_START,
    _source_model,
    _tokenizer,
    write_gguf,
)

CASES = {  # name -> (GGUF architecture, quantization type, chat template in the metadata)
    "llama-Q4_0": ("llama", "Q4_0", CHATML),
    "qwen2-Q8_0": ("qwen2", "Q8_0", None),
}
MESSAGES = [{"role": "user", "content": "What is json?"}]


def _qwen2(vocab_size: int, seed: int) -> Any:
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=vocab_size, initializer_range=0.15, tie_word_embeddings=False,
                      bos_token_id=IM_START, eos_token_id=ENDOFTEXT, **ARCH)
    model = Qwen2ForCausalLM(cfg).eval()
    with torch.no_grad():  # biases and norm gains that matter if they fail to load
        for name, param in model.named_parameters():
            if "norm" in name or name.endswith(".bias"):
                param.add_(0.3 * torch.randn_like(param))
    return model


@pytest.fixture(scope="module")
def ggufs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Any]]:
    """name -> (GGUF file, the torch model it was written from)."""
    root = tmp_path_factory.mktemp("user-gguf")
    tok = _tokenizer()
    out = {}
    for seed, (name, (arch, quant, template)) in enumerate(CASES.items()):
        model = (_source_model(tok.get_vocab_size(), tied=False, seed=11 + seed)
                 if arch == "llama" else _qwen2(tok.get_vocab_size(), seed=11 + seed))
        eos = IM_START if template else ENDOFTEXT  # as SmolLM2's GGUF: EOS names the turn start
        path = write_gguf(root / f"{name}.gguf", model, tok, quant=quant, chat_template=template,
                          eos_id=eos, arch=arch)
        out[name] = (path, model)
    return out


@pytest.mark.parametrize("name", list(CASES))
def test_user_gguf_builds_serves_and_answers_the_dequantized_models_tokens(
        name: str, ggufs: dict[str, tuple[Path, Any]], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    import torch
    from tokenizers import Tokenizer

    monkeypatch.setenv("GREENROUTE_CACHE_DIR", str(tmp_path / "cache"))
    gguf, source = ggufs[name]
    template = CASES[name][2]
    assert cli_main(["build", "--model", str(gguf), "--no-student", "--out",
                     str(tmp_path / "ladder")]) == 0
    capsys.readouterr()
    manifest = Manifest.load(tmp_path / "ladder")
    assert manifest.source["model"] == str(gguf)
    expected = GENAI_BUILDER if genai_builder_python() else OPTIMUM
    assert {v.exporter for v in manifest.variants.values()} == {expected}
    assert manifest.chat_template == ("checkpoint" if template else "fallback")
    # with a ChatML template the turn ends at <|im_end|>, whatever the GGUF's EOS metadata says
    assert manifest.eos_token_ids == ([IM_END] if template else [ENDOFTEXT])

    ckpt = resolve_checkpoint(str(gguf))  # the cached conversion the build used
    from transformers import AutoModelForCausalLM

    converted = AutoModelForCausalLM.from_pretrained(str(ckpt)).state_dict()
    weight = "model.layers.0.mlp.down_proj.weight"
    assert not torch.equal(converted[weight], source.state_dict()[weight])  # dequantized blocks

    tokenizer = Tokenizer.from_file(str(tmp_path / "ladder" / "tokenizer.json"))
    with TestClient(create_app(Settings(ladder_dir=tmp_path / "ladder", threads=1))) as client:
        wait_ready(client.get)
        models = client.get("/v1/models").json()["data"]
        assert {m["chat_template"] for m in models} == {manifest.chat_template}
        prompt = "The json module"
        ids = tokenizer.encode(prompt, add_special_tokens=False).ids
        want = greedy_tokens(ckpt, ids, 12, manifest.eos_token_ids)
        body = client.post("/v1/generate", json={"prompt": prompt, "max_new_tokens": 12,
                                                 "temperature": 0.0, "variant": "full"}).json()
        text_ids = want[:-1] if want[-1] in manifest.eos_token_ids else want
        assert body["usage"]["completion_tokens"] == len(text_ids)
        assert body["text"] == tokenizer.decode(text_ids)
        # chats are rendered with the GGUF's template (or the fallback): the prompt's tokens
        from models.runtime.chat import ChatTemplate

        rendered = ChatTemplate("checkpoint", template or FALLBACK_TEMPLATE).render(MESSAGES)
        assert rendered.startswith("<|im_start|>user\n" if template else "User: What is json?")
        chat = client.post("/v1/chat/completions", json={"model": "full", "max_tokens": 4,
                                                         "messages": MESSAGES})
        assert chat.status_code == 200, chat.text
        assert chat.json()["usage"]["prompt_tokens"] == len(
            tokenizer.encode(rendered, add_special_tokens=False).ids)
