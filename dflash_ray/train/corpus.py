"""The demo corpus: Python standard-library source of the running interpreter.

Owns which files are in the corpus, the fixed train / held-out split, and the held-out prompts
that benchmarks use.

Corpus rule: every `*.py` under `sysconfig.get_paths()["stdlib"]`, sorted by relative POSIX path,
skipping any path with a directory component in `SKIP_DIRS` (site-packages, test suites, IDLE,
lib2to3, turtledemo) and files larger than `MAX_FILE_BYTES`.

Held-out rule: a file is held out when `int(sha256(relative_posix_path)[:8], 16) % 100 <
HELDOUT_PERCENT` (4 %). The rule depends only on the relative path, so the split is stable across
machines, file order and Python patch releases; a file keeps its side of the split forever.
"""

from __future__ import annotations

import hashlib
import random
import sysconfig
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Protocol

SKIP_DIRS = frozenset({"site-packages", "test", "tests", "idlelib", "lib2to3", "turtledemo"})
MAX_FILE_BYTES = 200_000
HELDOUT_PERCENT = 4


class _Encoder(Protocol):
    def encode(self, text: str, add_special_tokens: bool = ...) -> list[int]: ...


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files(root: Path | None = None) -> list[Path]:
    """All corpus files, sorted by relative path (deterministic)."""
    root = root or stdlib_root()
    files = []
    for p in root.rglob("*.py"):
        rel = p.relative_to(root)
        if SKIP_DIRS.intersection(rel.parts[:-1]) or not p.is_file():
            continue
        if p.stat().st_size > MAX_FILE_BYTES:
            continue
        files.append(p)
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def is_heldout(rel_path: str) -> bool:
    digest = hashlib.sha256(rel_path.encode()).hexdigest()
    return int(digest[:8], 16) % 100 < HELDOUT_PERCENT


def split_files(root: Path | None = None) -> tuple[list[Path], list[Path]]:
    """(train_files, heldout_files), disjoint, each sorted."""
    root = root or stdlib_root()
    train, heldout = [], []
    for p in stdlib_files(root):
        (heldout if is_heldout(p.relative_to(root).as_posix()) else train).append(p)
    return train, heldout


def read_text(path: Path) -> str:
    # A few stdlib files carry latin-1 bytes in comments; replacement keeps the corpus lossless
    # enough for training while never failing on decode.
    return path.read_text(encoding="utf-8", errors="replace")


def iter_texts(files: Sequence[Path]) -> Iterator[str]:
    for p in files:
        yield read_text(p)


def heldout_prompts(
    tokenizer: _Encoder,
    n: int,
    prompt_tokens: int = 128,
    seed: int = 0,
    files: Sequence[Path] | None = None,
) -> list[list[int]]:
    """`n` deterministic prompts from held-out files, as token-id lists.

    Each prompt ends just after a top-level or nested `def `/`class ` line (newline included), so
    the model's job is to write the body; it starts about `prompt_tokens` tokens earlier. Cut points
    are drawn with `random.Random(seed)` from the sorted list of all eligible lines, so the same
    seed and tokenizer always give the same prompts.
    """
    files = split_files()[1] if files is None else files
    candidates: list[tuple[int, int]] = []  # (file index, char offset just past the def line)
    texts = [read_text(p) for p in files]
    for fi, text in enumerate(texts):
        offset = 0
        for line in text.splitlines(keepends=True):
            offset += len(line)
            stripped = line.lstrip()
            # Single-line defs ending in ':' only: their body is what follows the cut.
            if (
                stripped.startswith(("def ", "class "))
                and line.rstrip().endswith(":")
                and offset > 200
            ):
                candidates.append((fi, offset))
    rng = random.Random(seed)
    picked = rng.sample(candidates, min(n, len(candidates)))
    prompts = []
    for fi, end in sorted(picked):
        # Encode a generous character window, then keep the last `prompt_tokens` tokens: the
        # prompt then ends exactly at the def line's newline.
        start = max(0, end - prompt_tokens * 8)
        ids = tokenizer.encode(texts[fi][start:end], add_special_tokens=False)
        prompts.append(ids[-prompt_tokens:])
    return prompts
