"""Training data for a DFlash drafter: target-regenerated sequences and their target features.

Owns (1) the prompts (windows of the stdlib corpus, or a user's JSONL file), (2) regenerating
responses with the target itself (greedy, through our engine, batched) into `work/data.pt`, so
the drafter learns what the target actually says, and (3) capturing the target's hidden states
at the drafter's `target_layer_ids` for every position (cached once, or per batch). Works for
any supported target directory.
"""

from __future__ import annotations

import gc
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from tqdm import tqdm

from ..models.qwen3 import Qwen3Target
from ..worker.caches import ModelCache, StateRun
from ..worker.layout import SeqSpan, build_layout

if TYPE_CHECKING:
    from .drafter_args import DrafterTrainArgs


@dataclass(slots=True)
class TrainSequence:
    token_ids: list[int]  # prompt + regenerated response
    prompt_len: int
    features: torch.Tensor | None = None  # [S, K*H] target features (bf16 to save memory)


def prompt_windows(token_stream: list[int], n: int, min_len: int, max_len: int,
                   seed: int) -> list[list[int]]:
    """n random windows of a token stream, as prompts for regeneration."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        length = rng.randint(min_len, max_len)
        start = rng.randrange(0, max(1, len(token_stream) - length))
        out.append(token_stream[start : start + length])
    return out


def read_prompt_file(path: str, target_dir: str, max_tokens: int) -> list[list[int]]:
    """Token ids of the prompts in a JSONL file, one object per line: {"messages": [...]}
    (rendered with the target tokenizer's chat template, generation prompt appended, as the
    server does), {"prompt": "text"} or {"prompt_ids": [...]}. Prompts longer than `max_tokens`
    are skipped (cutting one would break its template); blank lines are ignored."""
    import json

    from ..core.chat_template import ChatTemplate
    from ..core.tokenizer import Tokenizer
    from ..models.hf_config import TargetConfig

    tok, chat = Tokenizer.maybe_load(target_dir), None
    vocab = TargetConfig.load(target_dir).vocab_size
    out, skipped = [], 0
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{where}: not a JSON object: {exc}") from None
            if not isinstance(obj, dict) or not obj.keys() & {"messages", "prompt", "prompt_ids"}:
                raise ValueError(f"{where}: wants a 'messages', 'prompt' or 'prompt_ids' field, "
                                 f"got {line.strip()[:80]}")
            if "prompt_ids" in obj:
                ids = obj["prompt_ids"]
                if not isinstance(ids, list) or not all(
                        type(t) is int and 0 <= t < vocab for t in ids):
                    raise ValueError(f"{where}: prompt_ids must be a list of token ids in "
                                     f"[0, {vocab}), got {str(ids)[:80]}")
            else:
                if tok is None:
                    raise ValueError(f"{where}: text prompts need a tokenizer.json in "
                                     f"{target_dir}")
                if "messages" in obj:
                    msgs = obj["messages"]
                    if not isinstance(msgs, list) or not msgs or not all(
                            isinstance(m, dict) and isinstance(m.get("role"), str)
                            and isinstance(m.get("content"), str) for m in msgs):
                        raise ValueError(f"{where}: messages must be a non-empty list of "
                                         f"{{\"role\": str, \"content\": str}}, got "
                                         f"{str(msgs)[:80]}")
                    chat = chat or ChatTemplate(tok.config.get("chat_template"))
                    try:
                        text = chat.render(msgs)
                    except Exception as exc:  # the template's own complaint, with the line
                        raise ValueError(f"{where}: messages: {exc}") from None
                else:
                    text = obj["prompt"]
                    if not isinstance(text, str):
                        raise ValueError(f"{where}: prompt must be a string, got {text!r:.80}")
                ids = tok.encode(text)  # as the engine encodes a text prompt
            if not ids or len(ids) > max_tokens:
                skipped += 1
                continue
            out.append(ids)
    if skipped:
        print(f"{path}: skipped {skipped} empty prompts or prompts over {max_tokens} tokens")
    return out


def regenerate(target_dir: str, prompts: list[list[int]], max_tokens: int,
               batch: int = 64, device: str = "cpu",
               dtype: str = "float32") -> list[TrainSequence]:
    """Greedy target continuations of `prompts` (stopping at EOS), in batches, on `device`."""
    from ..core.sampling_params import SamplingParams
    from ..llm import LLM

    llm = LLM(target_dir, max_num_seqs=batch, device=device, dtype=dtype)
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
    seqs = []
    try:
        for i in tqdm(range(0, len(prompts), batch), desc="regenerate", unit="batch"):
            chunk = prompts[i : i + batch]
            outs = llm.generate(chunk, params, use_tqdm=False)
            for prompt, out in zip(chunk, outs, strict=True):
                seqs.append(TrainSequence(prompt + out.token_ids, len(prompt)))
    finally:
        # the engine's weights and KV cache (most of a GPU's free memory) must be gone before
        # training loads the target again; the engine's reference cycles wait for the collector
        llm.engine.shutdown()
        del llm
        gc.collect()
        if torch.device(device).type == "cuda":
            torch.cuda.empty_cache()
    return seqs


@torch.inference_mode()
def capture_features(target: Qwen3Target, seqs: list[TrainSequence], layer_ids: list[int],
                     batch_tokens: int = 8192, dtype: torch.dtype = torch.bfloat16,
                     progress: bool = True, to_host: bool = True) -> None:
    """Fill `seq.features` with the target's features at `layer_ids` for every position, kept
    in host memory (`to_host`) or on the target's device."""
    device = target.embed_tokens.weight.device
    blen = 16
    i = 0
    bar = tqdm(total=len(seqs), desc="target features", unit="seq", disable=not progress)
    while i < len(seqs):
        group, tokens = [], 0
        while i < len(seqs) and (not group or tokens + len(seqs[i].token_ids) <= batch_tokens):
            group.append(seqs[i])
            tokens += len(seqs[i].token_ids)
            i += 1
        num_blocks = sum((len(s.token_ids) + blen - 1) // blen for s in group)
        cache = ModelCache(target.cache_specs(), num_blocks, blen,
                           target.embed_tokens.weight.dtype, device, num_slots=len(group))
        spans, ids, pos, runs, next_block = [], [], [], [], 0
        for j, s in enumerate(group):
            n = len(s.token_ids)
            nb = (n + blen - 1) // blen
            spans.append(SeqSpan(list(range(next_block, next_block + nb)), 0, n, n))
            runs.append(StateRun(torch.arange(len(ids), len(ids) + n, device=device)[None], [j],
                                 prefill=True))
            next_block += nb
            ids += s.token_ids
            pos += range(n)
        slots, groups = build_layout(spans, blen, causal=True, device=device)
        cache.plan_states(runs)  # a hybrid target's recurrent layers: every sequence a prefill
        _, feats = target(torch.tensor(ids, device=device), torch.tensor(pos, device=device),
                          cache, slots, groups, capture=layer_ids)
        offset = 0
        for s in group:
            n = len(s.token_ids)
            s.features = feats[offset : offset + n].to(dtype)
            if to_host:
                s.features = s.features.cpu()
            offset += n
        bar.update(len(group))
    bar.close()


def corpus_prompts(target_dir: str, n: int, lengths: tuple[int, int], heldout: bool, seed: int):
    from ..core.tokenizer import Tokenizer
    from .corpus import iter_texts, split_files

    tok = Tokenizer(target_dir)
    train_files, heldout_files = split_files()
    files = heldout_files if heldout else train_files
    rng = random.Random(seed)
    files = rng.sample(files, min(len(files), max(8, n // 2)))  # plenty of text for n windows
    stream: list[int] = []
    for text in iter_texts(files):
        stream += tok.encode(text)
    return prompt_windows(stream, n, lengths[0], lengths[1], seed)


def file_prompts(args: DrafterTrainArgs) -> list[tuple[int, ...]]:
    """The distinct prompts of `args.prompts` in a seeded shuffle: the order regeneration takes
    them in, skipping any already stored (by content, not position, so a file that grew or
    changed between runs never hands out a stored prompt again, a held-out one included)."""
    order = list(dict.fromkeys(map(tuple, read_prompt_file(args.prompts, args.target,
                                                           args.max_prompt_tokens))))
    random.Random(args.seed).shuffle(order)
    return order


def regenerated_data(args: DrafterTrainArgs, work: Path,
                     grow: bool = True) -> dict[str, list[TrainSequence]]:
    """The regenerated sequences in `work/data.pt`, made on first use. A later run with a
    larger `--num-seqs` regenerates only the missing sequences (new prompts) and appends them; a
    smaller one keeps everything stored (nothing is thrown away). `grow=False` (a checkpointed
    run) uses what is stored."""
    path = work / "data.pt"
    raw = torch.load(path) if path.is_file() else {}
    grew, from_file = False, None
    for split, n in (("heldout", args.heldout_seqs), ("train", args.num_seqs)):
        have = raw.setdefault(split, [])
        # the held-out set is made once (growing it would move the evaluation); train grows
        missing = n - len(have) if split == "train" or not have else 0
        if missing > 0 and (grow or not have):
            if args.prompts:
                from_file = from_file or file_prompts(args)
                used = {tuple(ids[:p]) for items in raw.values() for ids, p in items}
                prompts = [list(p) for p in from_file if p not in used][:missing]
                if len(prompts) < missing:
                    print(f"{args.prompts}: {len(prompts)} unused distinct prompts left of the "
                          f"{missing} asked for")
            else:
                # seed + len(have): the first batch of a split uses `seed` (as a fresh run
                # always did); each growth step draws different windows
                prompts = corpus_prompts(args.target, missing, args.prompt_tokens,
                                         split == "heldout", args.seed + len(have))
            if prompts:
                seqs = regenerate(args.target, prompts, args.response_tokens,
                                  device=args.device, dtype=target_dtype(args))
                have += [(s.token_ids, s.prompt_len) for s in seqs]
                grew = True
    if grew:
        tmp = path.with_suffix(".tmp")
        torch.save(raw, tmp)
        tmp.replace(path)
    return {split: [TrainSequence(ids, p) for ids, p in items
                    if len(ids) - p >= 2 * args.block_size]  # the recipe drops short responses
            for split, items in raw.items()}


def target_dtype(args: DrafterTrainArgs) -> str:
    """The target's weights' dtype name: `--target-dtype`, auto = bfloat16 on CUDA, else fp32."""
    if args.target_dtype != "auto":
        return args.target_dtype
    return "bfloat16" if torch.device(args.device).type == "cuda" else "float32"


def feature_mode(args: DrafterTrainArgs, seqs: list[TrainSequence], width: int) -> str:
    """`args.features`, with auto resolved: cached while every sequence's features (bf16,
    `width` values per token) take at most half the host memory available now."""
    if args.features != "auto":
        return args.features
    need = 2 * width * sum(len(s.token_ids) for s in seqs)
    try:
        free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # no sysconf: assume it fits
        return "cached"
    mode = "cached" if need <= free / 2 else "online"
    print(f"target features: {need / 2**30:.1f} GiB for {len(seqs)} sequences, "
          f"{free / 2**30:.1f} GiB available -> {mode}")
    return mode
