"""Committing a step's tokens to a request: incremental detokenization and stop conditions.

A verify step hands back up to B tokens at once. They are appended one at a time, so EOS, a stop
token id, a stop string or max_tokens inside the block ends the request exactly where plain
decoding would have ended it: later tokens are dropped and text after a stop string is cut.
"""

from __future__ import annotations

from .sequence import Sequence
from .tokenizer import Tokenizer, decode_delta


def commit_tokens(
    seq: Sequence, tokens: list[int], stop_ids: set[int], tokenizer: Tokenizer | None
) -> tuple[list[int], str, str | None]:
    """Append `tokens` to the sequence up to the first stop; returns (the token ids appended,
    the text released by them, the finish reason or None).

    With stop strings, text that a stop string could still begin in (its last
    `max(len(stop)) - 1` characters) is held back until a later token settles it, so a stop
    string split across steps never reaches a stream; `seq.text_sent` marks what went out."""
    p = seq.params
    new_ids: list[int] = []
    reason = None
    for tok in tokens:
        if seq.remaining <= 0:
            break
        seq.output_ids.append(tok)
        new_ids.append(tok)
        if p.stop and tokenizer is not None:
            cut = _stop_string_start(seq, len(_detokenize(seq, tokenizer)))
            if cut is not None:
                seq.text = seq.text[:cut]
                reason = "stop"
                break
        if tok in stop_ids:
            reason = "stop"
            break
    if not p.stop and tokenizer is not None:  # no stop strings: decode the whole delta once
        _detokenize(seq, tokenizer)
    if reason is None and seq.remaining <= 0:
        reason = "length"
    end = len(seq.text)
    if reason is None and p.stop:
        end = max(seq.text_sent, end - (max(map(len, p.stop)) - 1))
    new_text = seq.text[seq.text_sent : end]
    seq.text_sent = end
    return new_ids, new_text, reason


def _detokenize(seq: Sequence, tokenizer: Tokenizer) -> str:
    delta, seq.prefix_offset, seq.read_offset = decode_delta(
        tokenizer, seq.output_ids, seq.prefix_offset, seq.read_offset
    )
    seq.text += delta
    return delta


def _stop_string_start(seq: Sequence, delta_len: int) -> int | None:
    """Index in seq.text where the earliest stop string that the newest delta completed begins,
    or None."""
    best = None
    for s in seq.params.stop:
        start = max(0, len(seq.text) - delta_len - len(s) + 1)
        i = seq.text.find(s, start)
        if i != -1 and (best is None or i < best):
            best = i
    return best
