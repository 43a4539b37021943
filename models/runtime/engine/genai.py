"""onnxruntime-genai's C++ generation loop behind the same :class:`Engine` interface.

Needs ``genai_config.json`` in the variant directory (written at build time by
:mod:`models.build.pipeline.genai_config`). Sampling uses genai's own sampler: a seed reproduces a
sample within this runtime, not across runtimes.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from models.runtime.engine.base import Engine, GenerationParams, VariantLoadError

GENAI_SEEDS = 2**31  # seeds are reduced modulo this: the same seed still reproduces its sample


class GenaiEngine(Engine):
    """Decoding through ``onnxruntime_genai.Generator``."""

    runtime = "onnxruntime-genai"

    def __init__(
        self,
        variant_dir: Path,
        tokenizer: Tokenizer,
        context_length: int,
        eos_token_ids: Sequence[int],
        device: str = "cpu",
    ) -> None:
        super().__init__(tokenizer, context_length, eos_token_ids)
        try:
            import onnxruntime_genai as og
        except ImportError as err:  # optional runtime
            raise VariantLoadError(f"onnxruntime-genai is not installed: {err}") from err
        self._og = og
        if not (variant_dir / "genai_config.json").is_file():
            raise VariantLoadError(f"genai_config.json not found in {variant_dir}")
        try:
            config = og.Config(str(variant_dir))
            config.clear_providers()
            if device == "cuda":
                config.append_provider("cuda")
            self.model = og.Model(config)
        except Exception as err:  # genai raises RuntimeError with multi-line details
            raise VariantLoadError(f"cannot load {variant_dir}: {err}".splitlines()[0]) from err
        self.device = device
        config_text = (variant_dir / "genai_config.json").read_text()
        self.vocab_size = int(json.loads(config_text).get("model", {}).get("vocab_size", 0))

    def _token_ids(self, prompt_ids: Sequence[int], params: GenerationParams) -> Iterator[int]:
        og = self._og
        gp = og.GeneratorParams(self.model)
        options: dict[str, float | int | bool] = {
            "max_length": len(prompt_ids) + params.max_new_tokens,
            "do_sample": not params.greedy,
        }
        if not params.greedy:
            # genai refuses a top_k over the vocabulary, which means no top-k filtering anyway
            over = self.vocab_size and params.top_k >= self.vocab_size  # 0: size unknown
            top_k = 0 if over else params.top_k
            options.update(temperature=params.temperature, top_p=params.top_p, top_k=top_k)
            if params.seed is not None:  # genai's seed is a signed 32-bit int
                options["random_seed"] = params.seed % GENAI_SEEDS
        gp.set_search_options(**options)
        generator = og.Generator(self.model, gp)
        generator.append_tokens(np.asarray(prompt_ids, dtype=np.int32))
        for _ in range(params.max_new_tokens):
            if generator.is_done():
                return
            generator.generate_next_token()
            yield int(generator.get_next_tokens()[0])
