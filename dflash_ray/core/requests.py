"""A request's admission checks: its prompt as token ids, and whether it fits the model's
context and the KV cache at all. Errors are `InvalidRequest`s naming the field to fix."""

from __future__ import annotations

from .sampling_params import InvalidRequest, SamplingParams
from .tokenizer import Tokenizer


def prompt_ids(prompt: str | list[int], tokenizer: Tokenizer | None, vocab_size: int) -> list[int]:
    if isinstance(prompt, str):
        if tokenizer is None:
            raise InvalidRequest(
                "prompt is text but the target directory has no tokenizer.json", "prompt"
            )
        try:
            prompt.encode("utf-8")
        except UnicodeEncodeError as exc:  # a lone surrogate ("\ud800" in JSON)
            raise InvalidRequest(
                f"prompt contains a lone UTF-16 surrogate {prompt[exc.start]!r} at character "
                f"{exc.start}, which is no Unicode text; send valid Unicode",
                "prompt",
            ) from None
        ids = tokenizer.encode(prompt)
    else:
        ids = list(prompt)
        if not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
            raise InvalidRequest("prompt token ids must be integers", "prompt")
        bad = [t for t in ids if not 0 <= t < vocab_size]
        if bad:
            raise InvalidRequest(
                f"prompt token ids {bad[:5]} are outside the vocab (0..{vocab_size - 1})",
                "prompt",
            )
    if not ids:
        raise InvalidRequest("prompt is empty", "prompt")
    return ids


def check_fits(num_prompt: int, params: SamplingParams, max_model_len: int, num_blocks: int,
               blocks_needed: int) -> None:
    """`blocks_needed`: KV blocks for the prompt, max_tokens and one verify block. The error
    names the field to change: the prompt when it alone leaves no room for one token."""
    if num_prompt >= max_model_len:
        raise InvalidRequest(
            f"prompt ({num_prompt} tokens) leaves no room to generate within the context "
            f"length max_model_len={max_model_len}; shorten it",
            "prompt",
        )
    if num_prompt + params.max_tokens > max_model_len:
        raise InvalidRequest(
            f"prompt ({num_prompt} tokens) + max_tokens ({params.max_tokens}) exceeds the "
            f"context length max_model_len={max_model_len}; max_tokens can be at most "
            f"{max_model_len - num_prompt} here",
            "max_tokens",
        )
    if blocks_needed > num_blocks:
        raise InvalidRequest(
            f"prompt + max_tokens needs {blocks_needed} KV blocks but the cache has "
            f"{num_blocks}; lower max_tokens or raise num_kv_blocks",
            "max_tokens",
        )
