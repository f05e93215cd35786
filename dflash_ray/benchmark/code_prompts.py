"""Held-out code from outside the demo pair's corpus: function headers with their docstrings,
taken from third-party packages installed beside this one (the corpus is the standard library
without site-packages, `train/corpus.py`).

Each prompt is one function's `def` line(s) and docstring, dedented, ending on the newline after
the docstring, so the model's job is to write the body. Selection is deterministic: each package's
files (sorted, then shuffled by `random.Random(seed)`) give one function each, the packages
taking turns.
"""

from __future__ import annotations

import ast
import importlib.util
import random
import textwrap
from collections.abc import Iterator
from pathlib import Path

PACKAGES = ("numpy", "pydantic", "httpx", "jinja2")
SKIP_DIRS = frozenset({"tests", "test", "testing", "_vendor", "vendored"})
MIN_CHARS, MAX_CHARS = 120, 800  # a header with a docstring worth reading, and no manual page


def package_files(package: str) -> list[Path]:
    """The package's `*.py` files, sorted by relative path, test suites left out; none when the
    package is not installed."""
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        return []
    root = Path(spec.origin).parent
    return sorted(p for p in root.rglob("*.py")
                  if not SKIP_DIRS & set(p.relative_to(root).parts[:-1]))


def headers(text: str) -> list[str]:
    """Every function's header + docstring in `text`, dedented, in source order."""
    try:
        tree = ast.parse(text)
    except (SyntaxError, ValueError):
        return []
    lines = text.splitlines(keepends=True)
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) or not node.body:
            continue
        doc = node.body[0]
        if not (isinstance(doc, ast.Expr) and isinstance(doc.value, ast.Constant)
                and isinstance(doc.value.value, str)):
            continue
        # from the `def` line (decorators left out) to the docstring's last line
        snippet = textwrap.dedent("".join(lines[node.lineno - 1:doc.end_lineno]))
        if MIN_CHARS <= len(snippet) <= MAX_CHARS and snippet.endswith("\n"):
            found.append((node.lineno, snippet))
    return [s for _, s in sorted(found)]


def _one_per_file(files: list[Path], rng: random.Random) -> Iterator[str]:
    for f in files:
        found = headers(f.read_text(errors="replace"))
        if found:
            yield rng.choice(found)


def thirdparty_texts(n: int, packages: tuple[str, ...] = PACKAGES, seed: int = 0) -> list[str]:
    """`n` headers, one a file, drawn from each installed package of `packages` in turn (fewer
    if they run out); only the files drawn are parsed."""
    streams = []
    for package in packages:
        rng = random.Random(f"{seed}/{package}")
        files = package_files(package)
        rng.shuffle(files)
        streams.append(_one_per_file(files, rng))
    if not any(package_files(p) for p in packages):
        raise ValueError(f"none of {list(packages)} is installed: no held-out code prompts")
    picked: list[str] = []
    while streams and len(picked) < n:
        for stream in list(streams):
            text = next(stream, None)
            if text is None:
                streams.remove(stream)
            elif len(picked) < n:
                picked.append(text)
    return picked


def thirdparty_prompts(target_dir: str, n: int, packages: tuple[str, ...] = PACKAGES,
                       seed: int = 0) -> list[list[int]]:
    """The headers as token ids of the target's tokenizer; a target without one (the tests'
    random models) gets each text's UTF-8 bytes folded into its vocabulary."""
    from ..core.tokenizer import Tokenizer

    texts = thirdparty_texts(n, packages, seed)
    tok = Tokenizer.maybe_load(target_dir)
    if tok is not None:
        return [tok.encode(t, add_special_tokens=False) for t in texts]
    from ..models.hf_config import TargetConfig

    vocab = TargetConfig.load(target_dir).vocab_size
    return [[1 + b % (vocab - 1) for b in t.encode()] for t in texts]
