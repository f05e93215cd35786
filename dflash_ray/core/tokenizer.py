"""Text <-> token ids with the target directory's `tokenizer.json`, plus incremental decoding.

Uses the `tokenizers` library directly (no transformers at run time). A target directory without
tokenizer files still serves token-id prompts.
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer as _Tok


class Tokenizer:
    def __init__(self, model_dir: str | Path):
        d = Path(model_dir)
        self._tok = _Tok.from_file(str(d / "tokenizer.json"))
        cfg_path = d / "tokenizer_config.json"
        self.config = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}

    @classmethod
    def maybe_load(cls, model_dir: str | Path) -> Tokenizer | None:
        return cls(model_dir) if (Path(model_dir) / "tokenizer.json").is_file() else None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        # encode_batch lets go of the GIL while it works (encode holds it), so a long prompt
        # does not stop the engine's other threads
        return self._tok.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=True)

    def token_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)


def decode_delta(tok: Tokenizer, ids: list[int], prefix: int, read: int) -> tuple[str, int, int]:
    """New text since `read`, decoding from `prefix` so multi-token characters and leading spaces
    come out right. Returns (delta, new_prefix, new_read); holds back while a character is
    incomplete (the decoder shows U+FFFD)."""
    before = tok.decode(ids[prefix:read])
    after = tok.decode(ids[prefix:])
    if after.endswith("\ufffd") or len(after) <= len(before):
        return "", prefix, read
    return after[len(before) :], read, len(ids)
