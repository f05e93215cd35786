"""Committing a verify block's tokens: stops inside the block end the request where plain
decoding would, with the shipped pair's tokenizer for text."""

from __future__ import annotations

import pytest

from dflash_ray import demo_pair
from dflash_ray.core.outputs import RequestMetrics
from dflash_ray.core.sampling_params import SamplingParams
from dflash_ray.core.sequence import Sequence
from dflash_ray.core.step_io import SamplingSpec
from dflash_ray.core.stopping import commit_tokens
from dflash_ray.core.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tok():
    return Tokenizer(demo_pair()[0])


def seq(**params) -> Sequence:
    return Sequence(seq_id=0, prompt_ids=[1], params=SamplingParams(**params),
                    sampling=SamplingSpec(0.0, 1.0, 0, 0), metrics=RequestMetrics(0.0))


def test_stop_id_inside_a_block_drops_the_rest(tok):
    s = seq(max_tokens=50)
    ids = tok.encode("def f(x):\n    return x\n", add_special_tokens=False)
    new, text, reason = commit_tokens(s, ids + [0, 7, 8], {0}, tok)
    assert (new, reason) == (ids + [0], "stop") and s.output_ids == ids + [0]
    assert text == "def f(x):\n    return x\n"  # the stop id is special: no text


def test_max_tokens_cuts_a_block_and_text_follows_across_calls(tok):
    s = seq(max_tokens=5)
    ids = tok.encode("import os\nimport sys\nimport json\n", add_special_tokens=False)
    assert len(ids) > 5
    new1, text1, r1 = commit_tokens(s, ids[:3], set(), tok)
    new2, text2, r2 = commit_tokens(s, ids[3:], set(), tok)
    assert (new1 + new2, r1, r2) == (ids[:5], None, "length")
    assert text1 + text2 == s.text == tok.decode(ids[:5])


def test_stop_string_inside_a_block_cuts_text_and_tokens(tok):
    s = seq(max_tokens=50, stop=["return"])
    ids = tok.encode("def f(x):\n    return x\n", add_special_tokens=False)
    new, text, reason = commit_tokens(s, ids, set(), tok)
    assert reason == "stop" and text == s.text == "def f(x):\n    "
    # tokens stop at the one that completed the stop string
    assert new == ids[: len(new)] and "return" in tok.decode(new) and len(new) < len(ids)


def test_stop_string_split_across_steps_never_streams(tok):
    """One token per step: no delta ever carries text of the stop string, the deltas add up to
    the final text, and a request without a stop string at its end releases everything."""
    ids = tok.encode("def f(x):\n    return x\n", add_special_tokens=False)
    s = seq(max_tokens=50, stop=["rn x"])  # "return" and " x" are separate tokens
    deltas, reason = [], None
    for t in ids:
        _, text, reason = commit_tokens(s, [t], set(), tok)
        deltas.append(text)
        if reason:
            break
    assert reason == "stop" and "".join(deltas) == s.text == "def f(x):\n    retu"
    s = seq(max_tokens=len(ids), stop=["never"])
    out = "".join(commit_tokens(s, [t], set(), tok)[1] for t in ids)
    assert out == s.text == "def f(x):\n    return x\n"
