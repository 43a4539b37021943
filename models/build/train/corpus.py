"""Text corpora from the Python 3.11 docs' reStructuredText sources: training text for the tiny
test models, and the held-out chat evaluation text (:func:`write_faq_heldout`).

Source: Debian package ``python3.11-doc`` (PSF licence), folder ``html/_sources``.
Documents are joined with the end-of-text token. The committed held-out file
``models/data/heldout.txt`` is the Python FAQ as ChatML turns (written by
:func:`write_faq_heldout`): human-written answers in the format an instruct model serves.
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


def split_documents(sources: Path, exclude: tuple[str, ...] = ()) -> tuple[list[str], list[str]]:
    """Return (train, heldout) documents, each list in sorted path order; paths starting with
    an ``exclude`` prefix are in neither."""
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
        if rel.startswith(exclude):
            continue
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


FAQ_SOURCES = DEFAULT_SOURCES / "faq"
_HEADING = re.compile(r"^(?P<title>[^\n]+)\n(?P<rule>[-=~^]{3,})\n", re.MULTILINE)
_ROLE = re.compile(r":(?:ref|func|mod|class|meth|data|attr|exc|term|file|program|pep|envvar|"
                   r"option|keyword|c:\w+|py:\w+):`(?:[^`<]*<)?~?([^`>]+)>?`")
_LINK = re.compile(r"`([^`<]+?)\s*<[^>]+>`_+")


def _plain(rst: str) -> str:
    """reST to readable text: roles and links keep their text, directives are dropped."""
    text = _LINK.sub(r"\1", _ROLE.sub(r"\1", rst))
    lines = [ln for ln in text.splitlines() if not ln.lstrip().startswith(".. ")]
    return _clean("\n".join(lines).replace("``", "`").replace("::\n", ":\n"))


def faq_chats(faq_dir: Path = FAQ_SOURCES) -> list[tuple[str, str]]:
    """(question, answer) pairs from the Python FAQ: every ``?``-titled section is a question
    (its title), written by people, and its body the answer."""
    pairs: list[tuple[str, str]] = []
    for path in sorted(faq_dir.glob("*.txt")):
        text = path.read_text(encoding="utf-8")
        heads = list(_HEADING.finditer(text))
        for i, head in enumerate(heads):
            nxt = heads[i + 1] if i + 1 < len(heads) else None
            title = head.group("title").strip()
            if not title.endswith("?"):
                continue
            body = _plain(text[head.end(): nxt.start() if nxt else len(text)])
            if len(body) >= 80:
                pairs.append((title, body))
    return pairs


def write_faq_heldout(out: Path, faq_dir: Path = FAQ_SOURCES,
                      max_bytes: int = HELDOUT_MAX_BYTES) -> int:
    """The held-out evaluation text for chat models: FAQ pairs as ChatML turns (PSF licence),
    in file order, up to ``max_bytes``; return the bytes written."""
    chunks: list[str] = []
    size = 0
    for question, answer in faq_chats(faq_dir):
        turn = (f"<|im_start|>user\n{question}<|im_end|>\n"
                f"<|im_start|>assistant\n{answer}<|im_end|>\n")
        if size + len(turn.encode()) > max_bytes:
            break
        chunks.append(turn)
        size += len(turn.encode())
    out.write_text("".join(chunks), encoding="utf-8")
    return size


def write_distillation_text(out: Path, sources: Path = DEFAULT_SOURCES) -> int:
    """The Python docs' training split without the FAQ (held out as ``heldout.txt``), joined by
    the end-of-text token: general text for distilling a student (gzip when ``out`` ends
    ``.gz``); return the documents written."""
    import gzip

    train, _ = split_documents(sources, exclude=("faq/",))
    text = f"\n{EOT}\n".join(train) + "\n"
    if out.suffix == ".gz":
        out.write_bytes(gzip.compress(text.encode("utf-8"), mtime=0))
    else:
        out.write_text(text, encoding="utf-8")
    return len(train)
