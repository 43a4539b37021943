"""Prepare the default model's corpus: the reStructuredText sources of the Python 3.11 docs.

Source: Debian package ``python3.11-doc`` (PSF licence), folder ``html/_sources``.
Documents are joined with the end-of-text token; a deterministic few hundred KB of whole
documents is held out for quality evaluation and committed as ``models/data/heldout.txt``.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

EOT = "<|endoftext|>"
DEFAULT_SOURCES = Path("/usr/share/doc/python3.11/html/_sources")
HELDOUT_MAX_BYTES = 250_000
HELDOUT_EVERY = 40  # a document is held out when hash(path) % HELDOUT_EVERY == 0

_BLANK_RUNS = re.compile(r"\n{3,}")


def _clean(text: str) -> str:
    """Normalise whitespace; keep the markup (the model learns reST as it is)."""
    text = text.replace("\r\n", "\n").replace("\t", "    ")
    return _BLANK_RUNS.sub("\n\n", text).strip()


def split_documents(sources: Path) -> tuple[list[str], list[str]]:
    """Return (train, heldout) documents, each list in sorted path order."""
    files = sorted(p for p in sources.rglob("*.txt") if p.is_file())
    if not files:
        raise FileNotFoundError(f"no *.txt documents under {sources}")
    train: list[str] = []
    heldout: list[str] = []
    held_bytes = 0
    for path in files:
        text = _clean(path.read_text(encoding="utf-8", errors="replace"))
        if not text:
            continue
        rel = path.relative_to(sources).as_posix()
        digest = int(hashlib.sha1(rel.encode()).hexdigest(), 16)
        size = len(text.encode())
        if digest % HELDOUT_EVERY == 0 and held_bytes + size <= HELDOUT_MAX_BYTES:
            heldout.append(text)
            held_bytes += size
        else:
            train.append(text)
    return train, heldout


def write_corpus(sources: Path, train_out: Path, heldout_out: Path) -> tuple[int, int]:
    """Write both splits joined by the end-of-text token; return their sizes in bytes."""
    train, heldout = split_documents(sources)
    sep = f"\n{EOT}\n"
    train_out.parent.mkdir(parents=True, exist_ok=True)
    heldout_out.parent.mkdir(parents=True, exist_ok=True)
    train_out.write_text(sep.join(train) + "\n", encoding="utf-8")
    heldout_out.write_text(sep.join(heldout) + "\n", encoding="utf-8")
    return train_out.stat().st_size, heldout_out.stat().st_size
