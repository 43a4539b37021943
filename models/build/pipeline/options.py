"""What a build makes: its options and the committed inputs it reads by default."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from models import PACKAGE_DIR
from models.build.pipeline import quantize as q
from models.build.pipeline.gguf_source import DEFAULT_MODEL
from models.build.pipeline.tasks import DEFAULT_TASKS
from models.runtime.manifest import default_ladder_dir

DEFAULT_TEACHER = DEFAULT_MODEL  # SmolLM2-135M-Instruct from its PyPI wheel (gguf_source)
DEFAULT_STUDENT = PACKAGE_DIR / "default" / "student"  # its distilled blocks (train.distil)
DEFAULT_HELDOUT = PACKAGE_DIR / "data" / "heldout.txt"

Log = Callable[[str], None]


@dataclass
class BuildOptions:
    """What to build. ``student=None`` and ``distill_layers=None``: no distilled rungs."""

    model: str = DEFAULT_TEACHER
    student: str | None = str(DEFAULT_STUDENT)
    distill_layers: int | None = None
    distill_steps: int = 400
    corpus: str | None = None
    out: Path = field(default_factory=lambda: default_ladder_dir())
    heldout: Path = DEFAULT_HELDOUT
    tasks: Path | None = DEFAULT_TASKS  # None: no task score
    eval_tokens: int = 8192
    eval_window: int = 256
    calibration_tokens: int = 48
    calibration_repeats: int = 7
    threads: int = 2
    opset: int = 18
    consider_int4: bool = True
    speculative: bool = True  # measure drafts for a speculative rung (pipeline/speculative.py)
    force: bool = False
    # race every candidate even where this model and CPU class have recorded decisions
    # (pipeline/decisions.py); not in the build key: the races' outcome is what a key records
    race: bool = False
    # python of an environment with onnxruntime-genai's model builder (see Makefile); None:
    # optimum's exporter for every architecture
    genai_builder: str | None = None

    def config_for_hash(self) -> dict[str, Any]:
        """The settings that change the built files (paths and ``force`` do not)."""
        import onnxruntime

        return {
            "eval_tokens": self.eval_tokens,
            "eval_window": self.eval_window,
            "opset": self.opset,
            "consider_int4": self.consider_int4,
            "distill_layers": self.distill_layers,
            "distill_steps": self.distill_steps if self.distill_layers else None,
            "quant_candidates": [asdict(m) for m in (*q.candidates_8bit(), *q.CANDIDATES_4BIT)],
            "onnxruntime": onnxruntime.__version__,
            "exporter": "genai-builder, else optimum" if self.genai_builder else "optimum",
            "heldout_sha256": hashlib.sha256(self.heldout.read_bytes()).hexdigest(),
            "tasks_sha256": (hashlib.sha256(self.tasks.read_bytes()).hexdigest()
                             if self.tasks else None),
        }
