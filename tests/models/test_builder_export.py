"""Export through onnxruntime-genai's model builder: fused graph, same tokens, fallback."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import onnx
import pytest
from tokenizers import Tokenizer

from models.build.pipeline.export import GENAI_BUILDER, OPTIMUM, export_fp32
from models.runtime.engine.base import GenerationParams
from models.runtime.engine.ort import OrtEngine
from models.runtime.manifest import Manifest


def op_counts(onnx_file: Path) -> Counter[str]:
    graph = onnx.load(str(onnx_file), load_external_data=False).graph
    return Counter(node.op_type for node in graph.node)


def test_builder_graph_is_fused_and_much_smaller(random_llama: tuple[Path, Path],
                                                 random_llama_builder: tuple[Path, Path]) -> None:
    optimum, builder = op_counts(random_llama[1] / "model.onnx"), op_counts(
        random_llama_builder[1] / "model.onnx")
    layers = 2
    assert builder["GroupQueryAttention"] == layers and optimum["GroupQueryAttention"] == 0
    assert sum(builder.values()) * 4 < sum(optimum.values())
    assert (random_llama_builder[1] / "config.json").is_file()  # a complete variant directory


def test_ladder_records_the_builder_and_keeps_its_shared_buffer_config(
        tiny_ladder: Path, random_llama_builder: tuple[Path, Path]) -> None:
    manifest = Manifest.load(tiny_ladder)
    assert {v.exporter for v in manifest.variants.values()} == {GENAI_BUILDER}
    assert manifest.build_config["exporter"].startswith("genai-builder")
    for info in manifest.variants.values():
        cfg = json.loads((tiny_ladder / info.dir / "genai_config.json").read_text())
        decoder = cfg["model"]["decoder"]
        assert decoder["filename"] == info.file
        assert decoder["session_options"]["intra_op_num_threads"] == manifest.host["threads"]
        assert cfg["search"]["past_present_share_buffer"] is True
        assert "position_ids" not in decoder["inputs"]
        assert op_counts(tiny_ladder / info.dir / info.file)["GroupQueryAttention"] >= 1


def test_builder_failure_falls_back_to_optimum(random_llama: tuple[Path, Path],
                                               tmp_path: Path) -> None:
    said: list[str] = []
    exporter = export_fp32(random_llama[0], tmp_path / "full", 18, "/bin/false", said.append)
    assert exporter == OPTIMUM and (tmp_path / "full" / "model.onnx").is_file()
    assert len(said) == 1 and "genai builder could not export" in said[0]
    assert op_counts(tmp_path / "full" / "model.onnx")["GroupQueryAttention"] == 0


@pytest.mark.parametrize("builder", [None, ""])
def test_no_builder_means_optimum(random_llama: tuple[Path, Path], tmp_path: Path,
                                  builder: str | None) -> None:
    said: list[str] = []
    assert export_fp32(random_llama[0], tmp_path / "x", 18, builder, said.append) == OPTIMUM
    assert said == []


@pytest.mark.parametrize("params", [
    GenerationParams(max_new_tokens=40, ignore_eos=True),
    GenerationParams(max_new_tokens=40, temperature=1.0, top_p=0.9, seed=5, ignore_eos=True),
], ids=["greedy", "seeded"])
def test_shared_kv_buffer_decoding_matches_the_concat_path(
        random_llama_builder: tuple[Path, Path], params: GenerationParams) -> None:
    ckpt, onnx_dir = random_llama_builder
    tokenizer = Tokenizer.from_file(str(ckpt / "tokenizer.json"))
    shared = OrtEngine(onnx_dir / "model.onnx", tokenizer, 128, [0])
    concat = OrtEngine(onnx_dir / "model.onnx", tokenizer, 128, [0])
    concat.shared_kv = False
    assert shared.shared_kv
    ids = shared.encode("Return a new list of the items in")
    got = shared.generate(ids, params).token_ids
    assert got == concat.generate(ids, params).token_ids
    assert len(got) == 40 and len(set(got)) > 5
