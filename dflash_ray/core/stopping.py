"""Committing a step's tokens to a request: incremental detokenization and stop conditions.

A verify step hands back up to B tokens at once. They are appended one at a time, so EOS, a stop
token id, a stop string or max_tokens inside the block ends the request exactly where plain
decoding would have ended it: later tokens are dropped and text after a stop string is cut.
The commit comes in two halves (`take_tokens` on ints, `settle_text` with the tokenizer) so the
overlapped engine can schedule the next step between them.
"""

from __future__ import annotations

from .sequence import Sequence
from .tokenizer import Tokenizer, decode_delta


def commit_tokens(
    seq: Sequence, tokens: list[int], stop_ids: set[int], tokenizer: Tokenizer | None
) -> tuple[list[int], str, str | None]:
    """Append `tokens` to the sequence up to the first stop; returns (the token ids appended,
    the text released by them, the finish reason or None): `take_tokens` then `settle_text`."""
    new_ids, reason = take_tokens(seq, tokens, stop_ids)
    return settle_text(seq, new_ids, reason, tokenizer)


def take_tokens(
    seq: Sequence, tokens: list[int], stop_ids: set[int]
) -> tuple[list[int], str | None]:
    """The cheap half of a commit, on ints only: append `tokens` up to max_tokens and the first
    stop token id; returns (the ids appended, "stop" / "length" / None). What the next step's
    batch needs of the sequence is then known; a stop string among the new tokens (found by
    `settle_text`) can still shorten them."""
    new_ids: list[int] = []
    reason = None
    for tok in tokens:
        if seq.remaining <= 0:
            break
        seq.output_ids.append(tok)
        new_ids.append(tok)
        if tok in stop_ids:
            reason = "stop"
            break
    if reason is None and seq.remaining <= 0:
        reason = "length"
    return new_ids, reason


def settle_text(
    seq: Sequence, new_ids: list[int], reason: str | None, tokenizer: Tokenizer | None
) -> tuple[list[int], str, str | None]:
    """The text half of a commit: detokenize the ids `take_tokens` appended and look for stop
    strings one token at a time, so one inside the block ends the request exactly where plain
    decoding would have (the ids after it are removed again and the text is cut at it). Returns
    (the ids kept, the text released, the finish reason).

    With stop strings, text that a stop string could still begin in (its last
    `max(len(stop)) - 1` characters) is held back until a later token settles it, so a stop
    string split across steps never reaches a stream; `seq.text_sent` marks what went out."""
    p = seq.params
    if p.stop and tokenizer is not None:
        base = len(seq.output_ids) - len(new_ids)
        for k in range(len(new_ids)):
            cut = _stop_string_start(seq, len(_detokenize(seq, tokenizer, base + k + 1)))
            if cut is not None:
                seq.text = seq.text[:cut]
                del seq.output_ids[base + k + 1 :]
                new_ids, reason = new_ids[: k + 1], "stop"
                break
    elif tokenizer is not None:  # no stop strings: decode the whole delta once
        _detokenize(seq, tokenizer, len(seq.output_ids))
    end = len(seq.text)
    if reason is None and p.stop:
        end = max(seq.text_sent, end - (max(map(len, p.stop)) - 1))
    new_text = seq.text[seq.text_sent : end]
    seq.text_sent = end
    return new_ids, new_text, reason


def _detokenize(seq: Sequence, tokenizer: Tokenizer, upto: int) -> str:
    """Decode the output ids before `upto` not decoded yet."""
    delta, seq.prefix_offset, seq.read_offset = decode_delta(
        tokenizer, seq.output_ids[:upto], seq.prefix_offset, seq.read_offset
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
