"""Our decoding loop over an optimum-exported causal-LM graph with KV cache (onnxruntime only).

Each step's ``present.*`` outputs are fed back as the next step's ``past_key_values.*`` inputs,
never recomputed. On CPU they are numpy arrays passed to ``session.run`` (measured faster than
``IOBinding`` there: fewer Python→C++ calls per step); on CUDA they stay ``OrtValue``s on the GPU
through ``IOBinding`` and only the logits come back to the host for sampling.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

from models.runtime import kernels
from models.runtime.engine.base import Engine, GenerationParams, VariantLoadError
from models.runtime.engine.sampling import make_rng, select_token
from models.runtime.engine.session import aligned_zeros, providers_for, session_options

_log = logging.getLogger(__name__)
_PAST = re.compile(r"^past_key_values\.(\d+)\.(key|value)$")
_NP_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


def shares_kv_buffer(variant_dir: Path) -> bool:
    """``past_present_share_buffer`` from the variant's ``genai_config.json`` (the builder sets
    it for its GroupQueryAttention graphs; optimum's concat graphs never share)."""
    path = variant_dir / "genai_config.json"
    if not path.is_file():
        return False
    return bool(json.loads(path.read_text()).get("search", {}).get("past_present_share_buffer"))


def _head_dim_from_config(variant_dir: Path) -> int:
    """The KV head size when the graph leaves it symbolic (onnxruntime-genai's builder does):
    from the variant's ``genai_config.json`` or ``config.json``."""
    for name in ("genai_config.json", "config.json"):
        path = variant_dir / name
        if path.is_file():
            cfg = json.loads(path.read_text())
            cfg = cfg.get("model", {}).get("decoder", cfg)
            if "head_size" in cfg or "head_dim" in cfg:
                return int(cfg.get("head_size") or cfg["head_dim"])
            if "hidden_size" in cfg and "num_attention_heads" in cfg:
                return int(cfg["hidden_size"]) // int(cfg["num_attention_heads"])
    raise VariantLoadError(f"{variant_dir}: the graph's KV head size is symbolic and no "
                           "config.json/genai_config.json gives it")


@dataclass(frozen=True)
class KVLayout:
    """A decoder graph's KV cache and logits, as slots bind them: input and output names per
    layer, ``[batch, kv_heads, length, head_dim]`` of ``kv_dtype``, logits over ``vocab``."""

    past_names: list[str]
    present_names: list[str]
    kv_heads: int
    head_dim: int
    kv_dtype: Any
    vocab: int
    logits_dtype: Any


class OrtEngine(Engine):
    """KV-cached greedy/sampled decoding over one ONNX session."""

    runtime = "onnxruntime"
    threads: int  # always known for our sessions

    def __init__(
        self,
        model_path: Path,
        tokenizer: Tokenizer,
        context_length: int,
        eos_token_ids: Sequence[int],
        device: str = "cpu",
        threads: int = 2,
        wide_threads: int = 0,
        wide_from_rows: int = 0,
    ) -> None:
        super().__init__(tokenizer, context_length, eos_token_ids)
        if not model_path.is_file():
            raise VariantLoadError(f"ONNX file not found: {model_path}")
        self.threads = threads
        # a second session of the same graph on more threads, for wide forwards (steps of at
        # least ``wide_from_rows`` rows, prompts of at least as many tokens): a rung kept on one
        # core for its cheap narrow steps still uses both under load (see session_for)
        self.wide_session: ort.InferenceSession | None = None
        self.wide_from_rows = wide_from_rows
        self.model_path = model_path
        # the batched verify graph's session (load_verify), on the wide thread count
        self.verify_session: ort.InferenceSession | None = None
        try:
            self.session = ort.InferenceSession(
                str(model_path), session_options(threads), providers=providers_for(device)
            )
            if wide_threads > threads and wide_from_rows > 0:
                self.wide_session = ort.InferenceSession(
                    str(model_path), session_options(wide_threads),
                    providers=providers_for(device))
        except Exception as err:  # onnxruntime raises several unrelated types for bad files
            if kernels.OP_ROW_QUANT in str(err) and not kernels.available():
                raise VariantLoadError(f"{model_path} uses greenroute's kernels and they are "
                                       "not built: run `make kernels`") from err
            raise VariantLoadError(f"cannot load {model_path}: {err}".splitlines()[0]) from err
        self.wide_threads = wide_threads if self.wide_session is not None else 0
        self.device = "cuda" if "CUDAExecutionProvider" in self.session.get_providers() else "cpu"
        inputs = {i.name: i for i in self.session.get_inputs()}
        past = sorted(
            (int(m.group(1)), m.group(2) == "value", name)
            for name in inputs
            if (m := _PAST.match(name))
        )
        if "input_ids" not in inputs or not past:
            raise VariantLoadError(f"{model_path} is not a KV-cache decoder graph "
                                   "(needs input_ids and past_key_values.N.key/value)")
        self._past_names = [name for _, _, name in past]
        self._present_names = [n.replace("past_key_values", "present") for n in self._past_names]
        first = inputs[self._past_names[0]]
        self._kv_heads = int(first.shape[1])
        self._head_dim = (first.shape[3] if isinstance(first.shape[3], int)
                          else _head_dim_from_config(model_path.parent))
        self._kv_dtype = _NP_DTYPES[first.type]
        self._has_mask = "attention_mask" in inputs
        self._has_positions = "position_ids" in inputs
        # GroupQueryAttention graphs (genai builder) can write the new K/V in place into one
        # buffer per layer: no per-step concat or output allocation
        self.shared_kv = self._has_mask and shares_kv_buffer(model_path.parent)
        logits_out = self.session.get_outputs()[0]
        self._vocab, self._logits_dtype = int(logits_out.shape[-1]), _NP_DTYPES[logits_out.type]
        self._output_names = ["logits", *self._present_names]
        self.kv = KVLayout(self._past_names, self._present_names, self._kv_heads,
                           int(self._head_dim), self._kv_dtype, self._vocab, self._logits_dtype)
        # positions for single-sequence decoding: views of one array, no per-step allocation
        self._arange = np.arange(context_length, dtype=np.int64)[None, :]

    # -- one forward step -------------------------------------------------------------------
    def _empty_past(self, batch: int) -> list[Any]:
        shape = [batch, self._kv_heads, 0, self._head_dim]
        if self.device == "cpu":
            return [np.zeros(shape, dtype=self._kv_dtype) for _ in self._past_names]
        return [
            ort.OrtValue.ortvalue_from_shape_and_type(shape, self._kv_dtype, self.device, 0)
            for _ in self._past_names
        ]

    def forward(
        self,
        input_ids: np.ndarray,
        attention_mask: np.ndarray,
        past: list[Any],
        position_ids: np.ndarray | None = None,
    ) -> tuple[np.ndarray, list[Any]]:
        """Run ``input_ids`` [B, T] after ``past``; return (logits [B, T, V], new past).

        ``attention_mask`` covers past + new tokens; positions default to its running count.
        """
        feed: dict[str, Any] = {"input_ids": input_ids}
        if self._has_mask:
            feed["attention_mask"] = attention_mask
        if self._has_positions:
            if position_ids is None:
                position_ids = np.cumsum(attention_mask, axis=1, dtype=np.int64) - 1
                position_ids = np.maximum(position_ids, 0)[:, -input_ids.shape[1] :]
            feed["position_ids"] = position_ids
        if self.device == "cpu":
            feed.update(zip(self._past_names, past, strict=True))
            outputs = self.session.run(self._output_names, feed)
            return outputs[0], outputs[1:]
        binding = self.session.io_binding()
        for name, value in feed.items():
            binding.bind_cpu_input(name, np.ascontiguousarray(value))
        for name, value in zip(self._past_names, past, strict=True):
            binding.bind_ortvalue_input(name, value)
        binding.bind_output("logits", "cpu")
        for name in self._present_names:
            binding.bind_output(name, self.device)
        self.session.run_with_iobinding(binding)
        values = binding.get_outputs()
        return values[0].numpy(), list(values[1:])

    def session_for(self, rows: int) -> ort.InferenceSession:
        """The session for a forward over ``rows`` rows (a step) or tokens (a prompt): the
        wide one from ``wide_from_rows`` up, when there is one."""
        if self.wide_session is not None and rows >= self.wide_from_rows:
            return self.wide_session
        return self.session

    def load_verify(self) -> bool:
        """Load the graph's batched verify copy (:mod:`models.build.pipeline.verify_graph`:
        several new positions per row at batch > 1, for the speculative rung's target) where
        it was built, greenroute's kernels are, and the graph runs on the CPU; whether it is
        loaded. Called once when a speculative rung is made, never on a step."""
        path = kernels.verify_graph_path(self.model_path)
        # session_options registers greenroute's kernels where they are built
        if (self.verify_session is None and self.shared_kv and self.device == "cpu"
                and path.is_file() and kernels.available()):
            try:
                self.verify_session = ort.InferenceSession(
                    str(path), session_options(max(self.threads, self.wide_threads)),
                    providers=providers_for("cpu"))
            except Exception as err:  # noqa: BLE001 (an older kernels library, say)
                _log.warning("%s not loaded (rows verify one by one): %s", path,
                             str(err).splitlines()[0])
        return self.verify_session is not None

    def logits(self, ids: Sequence[int]) -> np.ndarray:
        """Logits [T, V] of a whole sequence in one pass (quality evaluation)."""
        arr = np.asarray([ids], dtype=np.int64)
        out, _ = self.forward(arr, np.ones_like(arr), self._empty_past(1))
        return out[0]

    # -- decoding ---------------------------------------------------------------------------
    def _token_ids(self, prompt_ids: Sequence[int], params: GenerationParams) -> Iterator[int]:
        if self.shared_kv:
            yield from self._token_ids_shared(prompt_ids, params)
            return
        rng = make_rng(params.seed)
        ids = np.asarray([prompt_ids], dtype=np.int64)
        length = ids.shape[1]
        ones = np.ones((1, length + params.max_new_tokens), dtype=np.int64)
        past = self._empty_past(1)
        logits, past = self.forward(ids, ones[:, :length], past, self._arange[:, :length])
        for _ in range(params.max_new_tokens):
            token = select_token(logits[0, -1], params, rng)
            yield token
            length += 1
            if length > ones.shape[1]:
                return
            logits, past = self.forward(np.asarray([[token]], dtype=np.int64),
                                        ones[:, :length], past,
                                        self._arange[:, length - 1 : length])

    def _token_ids_shared(self, prompt_ids: Sequence[int],
                          params: GenerationParams) -> Iterator[int]:
        """Decoding with one KV buffer per layer bound as both past and present: the graph
        writes each step's K/V in place (as onnxruntime-genai does). Every input and output of
        a decode step is bound once; a step writes two integers and runs."""
        rng = make_rng(params.seed)
        length = len(prompt_ids)
        max_len = length + params.max_new_tokens
        binding = self.session.io_binding()
        shape = [1, self._kv_heads, max_len, self._head_dim]
        # Bound values point into numpy arrays; they stay referenced from this frame until
        # decoding ends (the IOBinding wrapper keeps them too, but does not promise to).
        buffers = []
        for past, present in zip(self._past_names, self._present_names, strict=True):
            if self.device == "cpu":
                buffer = ort.OrtValue.ortvalue_from_numpy(aligned_zeros(shape, self._kv_dtype))
            else:
                buffer = ort.OrtValue.ortvalue_from_shape_and_type(shape, self._kv_dtype,
                                                                   self.device, 0)
            buffers.append(buffer)
            binding.bind_ortvalue_input(past, buffer)
            binding.bind_ortvalue_output(present, buffer)
        # the mask spans the whole buffer; its count of ones is the sequence so far
        mask = aligned_zeros((1, max_len), np.int64)
        mask[0, :length] = 1
        buffers.append(ort.OrtValue.ortvalue_from_numpy(mask))
        binding.bind_ortvalue_input("attention_mask", buffers[-1])
        binding.bind_cpu_input("input_ids", np.asarray([prompt_ids], dtype=np.int64))
        binding.bind_output("logits", "cpu")
        self.session.run_with_iobinding(binding)
        logits = binding.get_outputs()[-1].numpy()[0, -1]
        step = aligned_zeros((1, 1), np.int64)
        step_logits = aligned_zeros((1, 1, self._vocab), self._logits_dtype)
        buffers += [ort.OrtValue.ortvalue_from_numpy(step),
                    ort.OrtValue.ortvalue_from_numpy(step_logits)]
        binding.bind_ortvalue_input("input_ids", buffers[-2])
        binding.bind_ortvalue_output("logits", buffers[-1])
        for produced in range(1, params.max_new_tokens + 1):
            token = select_token(logits, params, rng)
            yield token
            if produced == params.max_new_tokens:
                return
            step[0, 0] = token
            mask[0, length] = 1
            length += 1
            self.session.run_with_iobinding(binding)
            logits = step_logits[0, -1]

    def generate_batch(
        self, prompts: Sequence[Sequence[int]], params: GenerationParams
    ) -> list[list[int]]:
        """Decode several prompts together (left-padded), ``max_new_tokens`` each, no early stop.

        Used for batch throughput measurements; rows share one random generator.
        """
        for p in prompts:
            self.check_fits(len(p), params.max_new_tokens)
        width = max(len(p) for p in prompts)
        if not self._has_positions and any(len(p) != width for p in prompts):
            # no position_ids input (genai builder graphs): positions and the attention span
            # come from each row's mask count, which assumes no left padding
            raise ValueError("this graph batches prompts of equal length only")
        pad = next(iter(self.eos_token_ids), 0)
        ids = np.full((len(prompts), width), pad, dtype=np.int64)
        mask = np.zeros_like(ids)
        for row, p in enumerate(prompts):
            ids[row, width - len(p) :] = p
            mask[row, width - len(p) :] = 1
        rng = make_rng(params.seed)
        past = self._empty_past(len(prompts))
        out: list[list[int]] = [[] for _ in prompts]
        for _ in range(params.max_new_tokens):
            logits, past = self.forward(ids, mask, past)
            nxt = [select_token(logits[row, -1], params, rng) for row in range(len(prompts))]
            for row, token in enumerate(nxt):
                out[row].append(token)
            ids = np.asarray(nxt, dtype=np.int64)[:, None]
            mask = np.concatenate([mask, np.ones((len(prompts), 1), dtype=np.int64)], axis=1)
        return out
