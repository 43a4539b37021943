"""Bring your own model: the architecture matrix, each a tiny random checkpoint saved as a user
saves theirs, built by ``greenroute build --model DIR --no-student --out DIR``, served by the
real app on real onnxruntime sessions, and answering PyTorch's greedy tokens.

The README's list of tested architectures is this matrix; ``EXPORTER`` is what the manifest
must record for each (the genai builder where it covers the architecture and its graph runs in
our loop, optimum otherwise).
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from tokenizers import Tokenizer

from app.main import create_app
from app.settings import Settings
from cli.main import main as cli_main
from models.build.pipeline.export import GENAI_BUILDER, OPTIMUM
from models.build.pipeline.options import DEFAULT_HELDOUT
from models.runtime.manifest import Manifest
from tests.app.conftest import wait_ready
from tests.conftest import genai_builder_python
from tests.models.byo import ARCHS, UNSUPPORTED, Arch, greedy_tokens, make_checkpoint

# With the builder environment present (always under CI); without it optimum exports everything.
EXPORTER = {"llama": GENAI_BUILDER, "mistral": GENAI_BUILDER, "qwen2": GENAI_BUILDER,
            "qwen3": GENAI_BUILDER, "phi3": GENAI_BUILDER, "gpt2": OPTIMUM, "gpt_neox": OPTIMUM,
            # the builder's sliding-window attention needs a KV buffer as long as the window,
            # which our loop's prefill from an empty cache does not have (export.builder_not_used)
            "gemma2": OPTIMUM, "gemma3": OPTIMUM,
            # the builder's OLMo graph does not reproduce PyTorch's logits: caught at build time
            # (models.build.pipeline.verify), re-exported with optimum
            "olmo": OPTIMUM}
PROMPTS = ["The json module", "How do I read a file?"]
NEW_TOKENS = 12


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("byo")


def checkpoint(root: Path, arch: Arch) -> Path:
    """The arch's random checkpoint (made once per module)."""
    out = root / "ckpt" / arch.name
    if not (out / "config.json").is_file():
        make_checkpoint(arch, out, DEFAULT_HELDOUT, seed=len(arch.name))
    return out


@pytest.fixture(scope="module")
def built(root: Path) -> Iterator[dict[str, tuple[int, Path]]]:
    """arch name -> (exit status of ``greenroute build``, ladder directory), built on demand."""
    yield {}


def build(root: Path, built: dict[str, tuple[int, Path]], arch: Arch) -> Path:
    if arch.name not in built:
        out = root / "ladder" / arch.name
        rc = cli_main(["build", "--model", str(checkpoint(root, arch)), "--no-student",
                       "--out", str(out)])
        built[arch.name] = (rc, out)
    rc, out = built[arch.name]
    assert rc == 0, f"greenroute build failed for {arch.name}"
    return out


@pytest.mark.parametrize("arch", ARCHS, ids=[a.name for a in ARCHS])
def test_architecture_builds_serves_and_answers_pytorchs_greedy_tokens(
        arch: Arch, root: Path, built: dict[str, tuple[int, Path]],
        capsys: pytest.CaptureFixture[str]) -> None:
    ladder = build(root, built, arch)
    manifest = Manifest.load(ladder)
    assert json.loads(capsys.readouterr().out)["build_key"] == manifest.build_key
    expected = EXPORTER[arch.name] if genai_builder_python() else OPTIMUM
    assert {v.exporter for v in manifest.variants.values()} == {expected}
    assert {"full", "int8"} <= set(manifest.variants)
    assert manifest.chat_template == ("checkpoint" if arch.chat_template else "fallback")

    ckpt = checkpoint(root, arch)
    tokenizer = Tokenizer.from_file(str(ckpt / "tokenizer.json"))
    settings = Settings(ladder_dir=ladder, threads=1)
    with TestClient(create_app(settings)) as client:
        wait_ready(client.get)
        models = client.get("/v1/models").json()["data"]
        assert {m["chat_template"] for m in models} == {manifest.chat_template}
        seen: set[int] = set()
        for prompt in PROMPTS:
            ids = tokenizer.encode(prompt, add_special_tokens=False).ids
            want = greedy_tokens(ckpt, ids, NEW_TOKENS, manifest.eos_token_ids)
            seen.update(want)
            got = client.post("/v1/generate", json={
                "prompt": prompt, "max_new_tokens": NEW_TOKENS, "temperature": 0.0,
                "variant": "full"})
            assert got.status_code == 200, got.text
            body = got.json()
            stopped = bool(want) and want[-1] in manifest.eos_token_ids
            assert body["finish_reason"] == ("stop" if stopped else "length")
            text_ids = want[:-1] if stopped else want  # the EOS token is not counted
            assert body["usage"]["completion_tokens"] == len(text_ids)
            assert body["text"] == tokenizer.decode(text_ids, skip_special_tokens=True)
        assert len(seen) > 6  # varied output: the comparison can tell graphs apart
        chat = client.post("/v1/chat/completions", json={
            "model": "full", "max_tokens": 4,
            "messages": [{"role": "user", "content": "Hi"}]})
        assert chat.status_code == 200, chat.text
        assert chat.json()["usage"]["prompt_tokens"] > 1


def test_an_architecture_no_exporter_covers_is_one_line(root: Path, tmp_path: Path) -> None:
    ckpt = checkpoint(root, UNSUPPORTED)
    proc = subprocess.run([sys.executable, "-m", "cli", "build", "--model", str(ckpt),
                           "--no-student", "--out", str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    lines = [ln for ln in proc.stderr.splitlines() if "Warning" not in ln and ln.strip()
             and not ln.startswith("  import pynvml")]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    line = lines[0]
    assert line.startswith("greenroute build: error: ")
    assert "MambaForCausalLM" in line and "(model type mamba) is not supported" in line
    assert "LlamaForCausalLM" in line and "gpt2" in line  # what is supported
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def small_corpus(root: Path) -> Path:
    """~2,000 tokens of the held-out text: enough rows of 129 tokens to distil on."""
    path = root / "corpus.txt"
    path.write_text(DEFAULT_HELDOUT.read_text(encoding="utf-8")[:8000], encoding="utf-8")
    return path


@pytest.mark.parametrize("arch", ARCHS, ids=[a.name for a in ARCHS])
def test_distil_layers_makes_a_student_of_every_architecture(arch: Arch, root: Path,
                                                             small_corpus: Path) -> None:
    """``--distill-layers 1``: a one-block student of the teacher's architecture (per-block
    settings such as Gemma's and Qwen's ``layer_types`` cut to the kept block) that loads,
    shares the teacher's embedding and computes its own logits."""
    import torch
    from transformers import AutoModelForCausalLM

    from models.build.pipeline.genai_config import normalized
    from models.build.train.distil import distil_on_corpus

    teacher_dir = checkpoint(root, arch)
    student_dir = distil_on_corpus(teacher_dir, 1, 2, small_corpus, root / "distil" / arch.name,
                                   threads=2, log=lambda _m: None)
    config = json.loads((student_dir / "config.json").read_text())
    assert normalized(config)["num_hidden_layers"] == 1
    assert len(config.get("layer_types") or [None]) == 1
    teacher = AutoModelForCausalLM.from_pretrained(str(teacher_dir)).eval()
    student = AutoModelForCausalLM.from_pretrained(str(student_dir)).eval()
    assert torch.equal(student.get_input_embeddings().weight,
                       teacher.get_input_embeddings().weight)
    ids = torch.tensor([[5, 60, 70, 100, 7]])
    with torch.no_grad():
        s_logits, t_logits = student(ids).logits, teacher(ids).logits
    assert s_logits.shape == t_logits.shape and not torch.allclose(s_logits, t_logits)


@pytest.mark.parametrize("arch", [a for a in ARCHS if a.name in ("gpt2", "gemma3")],
                         ids=["gpt2", "gemma3"])
def test_distilled_rungs_build_through_both_exporters(arch: Arch, root: Path, small_corpus: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    """The whole ``greenroute build --distill-layers 1 --corpus FILE`` on GPT-2 (optimum) and
    Gemma 3 (the builder, with per-block layer types): four rungs, the student smaller."""
    out = root / "ladder-distilled" / arch.name
    assert cli_main(["build", "--model", str(checkpoint(root, arch)), "--distill-layers", "1",
                     "--distill-steps", "2", "--corpus", str(small_corpus), "--out",
                     str(out)]) == 0
    capsys.readouterr()
    v = Manifest.load(out).variants
    assert {"full", "int8", "distilled", "distilled-int8"} <= set(v)
    assert v["distilled"].parameters < v["full"].parameters
    assert v["distilled"].exporter == v["full"].exporter
