"""The drafter side of a step: the DFlash drafter, its paged KV cache and the target's embedding
and LM head, on one device.

Owns the target features of committed tokens that are not yet in the drafter cache (`absorb`
stores them, the next `draft` materializes them), and the drafter's sampling streams. Knows
nothing of the target's weights beyond the two tensors it borrows, so it runs beside the target
(`ModelRunner`) or alone in a Ray actor.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..core.step_io import DecodeItem, SamplingSpec
from ..models.dflash import DFlashDrafter
from ..models.hf_config import TargetConfig
from ..models.layers import Linear, prepack
from ..models.loader import load_weights
from ..spec_decode import processed_probs, sample
from .caches import PagedKVCache, SeqSpan, build_layout, slot_mapping
from .worker_config import ModelSpec, RunnerConfig, seeded_generator

NO_DRAFT = -1  # a `Drafts.tokens` entry the target should not verify


@dataclass(slots=True)
class Drafts:
    """One drafter pass: a row per decode of the batch, in batch order."""

    # [N, B-1]: row i verifies its leading entries up to the first NO_DRAFT (at most q-1 of
    # them); the rest are not proposed (the drafter's confidence ran out, or q = 1)
    tokens: torch.Tensor
    # per decode: the distribution [>= proposed, V] its drafts were sampled from; None: greedy
    probs: list[torch.Tensor | None]


PROPOSE_CHUNK = 4  # block positions whose logits are computed together under a threshold


def proposed_lengths(tokens: torch.Tensor, num_queries: list[int]) -> list[int]:
    """Drafts each row proposes for verification: the leading non-NO_DRAFT entries, <= q-1."""
    lead = (tokens != NO_DRAFT).to(torch.int32).cumprod(dim=1).sum(dim=1).tolist()
    return [min(n, q - 1) for n, q in zip(lead, num_queries, strict=True)]


def proposal_length(
    own: torch.Tensor, top: torch.Tensor, prefix: float, threshold: float
) -> tuple[int, float]:
    """How many of a run of drafts to propose, and the drafter's probability of the proposed
    prefix afterwards. `own` [n]: the drafter's probability of each draft; `top` [n]: its largest
    probability at each position; `prefix`: the probability of the drafts proposed before.

    Draft k is proposed while prefix * prod_{j<k} own_j * top_k >= threshold: the drafts before
    it (which matter for k only if verification accepted them) times the drafter's best guess at
    k, never the probability of draft k's own sampled value. So whether k is verified does not
    depend on what was sampled at k, which rejection sampling needs to stay exact. Greedy drafts
    are the top tokens (own == top): the rule is then the probability of the prefix up to k.
    """
    before = prefix * torch.cat((own.new_ones(1), own[:-1])).cumprod(dim=0)
    n = int(((before * top) >= threshold).to(torch.int32).cumprod(dim=0).sum())
    return n, (prefix * float(own[:n].prod()) if n else prefix)


class PendingFeatures:
    """Target features [rows, K*H] of committed tokens a drafter has not taken in yet, per
    sequence. Steps without a drafter pass add rows; the next pass takes them all at once."""

    def __init__(self):
        self._parts: dict[int, list[torch.Tensor]] = {}

    def add(self, features: dict[int, torch.Tensor]) -> None:
        for sid, rows in features.items():
            self._parts.setdefault(sid, []).append(rows)

    def take(self, seq_id: int, rows: int) -> torch.Tensor:
        """All of a sequence's waiting rows, which must be `rows` many."""
        parts = self._parts.pop(seq_id, [])
        got = sum(p.shape[0] for p in parts)
        if got != rows or not parts:
            raise RuntimeError(
                f"seq {seq_id}: {got} pending feature rows, the drafter needs {rows}"
            )
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def drop(self, seq_ids: list[int]) -> None:
        for sid in seq_ids:
            self._parts.pop(sid, None)


class TargetHead(nn.Module):
    """The target's token embedding and LM head: all a drafter needs of the target. Loaded alone
    (two tensors read from the target checkpoint) where the target lives in another process."""

    def __init__(self, cfg: TargetConfig):
        super().__init__()
        hidden = cfg.decoder.hidden_size
        self.embed_tokens = nn.Embedding(cfg.vocab_size, hidden)
        self.lm_head = Linear(hidden, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [T, H] -> [T, V] in fp32, as the target computes them."""
        return self.lm_head(hidden).float()

    @classmethod
    def from_pretrained(cls, model_dir: str, dtype: torch.dtype, device) -> TargetHead:
        cfg = TargetConfig.load(model_dir)
        with torch.device("meta"):
            head = cls(cfg)
        head = head.to_empty(device=device).to(dtype)
        if cfg.tie_word_embeddings:
            head.lm_head.weight = head.embed_tokens.weight
        wanted = {"embed_tokens.weight"} | (
            set() if cfg.tie_word_embeddings else {"lm_head.weight"}
        )

        def rename(key: str) -> str | None:
            key = key.removeprefix("model.")
            return key if key in wanted else None

        load_weights(head, model_dir, rename)
        return head.eval()


class DraftWorker:
    def __init__(self, cfg: RunnerConfig, spec: ModelSpec, head: nn.Module | None = None):
        """`head` provides `embed` and `logits` (the in-process target itself), borrowed when
        the drafter runs in the target's dtype; otherwise the drafter loads its own copy of the
        target's embedding and LM head from `cfg.target`, in its dtype."""
        self.cfg, self.spec = cfg, spec
        self.device = torch.device(cfg.device)
        self.dtype = cfg.drafter_torch_dtype
        self.drafter = DFlashDrafter.from_pretrained(cfg.drafter, self.dtype, self.device)
        borrow = head is not None and self.dtype == cfg.torch_dtype
        self.head = head if borrow else TargetHead.from_pretrained(
            cfg.target, self.dtype, self.device
        )
        prepack(self.drafter)
        if not borrow:  # an in-process target packs itself
            prepack(self.head)
        self.cache: PagedKVCache | None = None
        self._pending = PendingFeatures()
        self._generators: dict[int, torch.Generator] = {}

    def kv_bytes_per_token(self) -> int:
        d = self.drafter.cfg.decoder
        return PagedKVCache.bytes_per_token(d.num_layers, d.num_kv_heads, d.head_dim, self.dtype)

    def allocate(self, num_blocks: int) -> None:
        d = self.drafter.cfg.decoder
        self.cache = PagedKVCache(
            d.num_layers,
            num_blocks,
            self.cfg.kv_block_len,
            d.num_kv_heads,
            d.head_dim,
            self.dtype,
            self.device,
        )

    def absorb(self, features: dict[int, torch.Tensor]) -> None:
        """Target features [c, K*H] of each sequence's newly committed tokens (in the target's
        dtype), taken in by the next drafter pass."""
        self._pending.add(features)

    def forget(self, seq_ids: list[int]) -> None:
        """Preempted sequences: their features are recomputed by their next prefill."""
        self._pending.drop(seq_ids)

    def release(self, seq_ids: list[int]) -> None:
        self._pending.drop(seq_ids)
        for sid in seq_ids:
            self._generators.pop(sid, None)

    def _generator(self, seq_id: int, spec: SamplingSpec) -> torch.Generator:
        gen = self._generators.get(seq_id)
        if gen is None:
            gen = self._generators[seq_id] = seeded_generator(spec, self.device, "drafter")
        return gen

    @torch.inference_mode()
    def draft(self, decodes: list[DecodeItem]) -> Drafts:
        """Drafts for the decoding sequences, all of which must have pending features."""
        dev, blen = self.device, self.cfg.kv_block_len
        # 1. Context K/V of the tokens committed since the last draft pass, written once.
        ctx_spans = [
            SeqSpan(d.block_table, d.drafted_ctx, d.start - d.drafted_ctx, 0) for d in decodes
        ]
        features = [self._pending.take(d.seq_id, d.start - d.drafted_ctx) for d in decodes]
        ctx_pos = torch.tensor(
            [p for s in ctx_spans for p in range(s.num_cached, s.num_cached + s.num_new)],
            dtype=torch.long,
            device=dev,
        )
        self.drafter.materialize_context(
            torch.cat(features).to(self.dtype), ctx_pos, slot_mapping(ctx_spans, blen, dev),
            self.cache,
        )
        # 2. One non-causal pass over every block [bonus, MASK, ...] of the decodes with q > 1
        # (q = 1: this pass only takes in the context; see StepBatch.drafter_pass).
        tokens = torch.full(
            (len(decodes), self.spec.block_size - 1), NO_DRAFT, dtype=torch.long, device=dev
        )
        probs: list[torch.Tensor | None] = [None] * len(decodes)
        drafting = [i for i, d in enumerate(decodes) if d.num_queries > 1]
        if not drafting:
            return Drafts(tokens, probs)
        spans = [
            SeqSpan(decodes[i].block_table, decodes[i].start, decodes[i].num_queries,
                    decodes[i].num_queries)
            for i in drafting
        ]
        write_slots, groups = build_layout(spans, blen, causal=False, device=dev)
        ids, pos = [], []
        for i in drafting:
            d = decodes[i]
            ids += [d.bonus] + [self.spec.mask_token_id] * (d.num_queries - 1)
            pos += range(d.start, d.start + d.num_queries)
        ids_t = torch.tensor(ids, dtype=torch.long, device=dev)
        pos_t = torch.tensor(pos, dtype=torch.long, device=dev)
        hidden = self.drafter(self.head.embed(ids_t), pos_t, self.cache, write_slots, groups)
        # 3. Drafts at block positions 1..q-1 from the target's LM head.
        self._propose(decodes, drafting, hidden, tokens, probs)
        return Drafts(tokens, probs)

    def _propose(
        self,
        decodes: list[DecodeItem],
        drafting: list[int],
        hidden: torch.Tensor,  # [sum of q over drafting, H] the drafter's block rows
        tokens: torch.Tensor,  # out: [N, B-1]
        probs: list[torch.Tensor | None],  # out
    ) -> None:
        """Draft tokens and how many of them to propose.

        With `spec_min_confidence` > 0 a sequence proposes its drafts while the drafter's
        probability of the draft prefix stays >= the threshold (`proposal_length`, which keeps
        sampling exact); it skips verifying drafts the target would likely reject, which pays
        where every verified token costs time (CPU). Logits are then computed PROPOSE_CHUNK
        positions at a time and only for sequences still confident: most of a block is never
        verified, so most of its LM-head rows are not worth computing.
        """
        dev, threshold = self.device, self.cfg.spec_min_confidence
        first, offset = {}, 0  # decode index -> its hidden row at block position 0
        for i in drafting:
            first[i] = offset
            offset += decodes[i].num_queries
        width = max(decodes[i].num_queries - 1 for i in drafting)
        chunk = PROPOSE_CHUNK if threshold > 0 else width
        prefix_prob = dict.fromkeys(drafting, 1.0)
        live = drafting
        for lo in range(0, width, chunk):
            spans = [(i, min(lo + chunk, decodes[i].num_queries - 1)) for i in live]
            spans = [(i, hi) for i, hi in spans if hi > lo]
            if not spans:
                break
            rows = [first[i] + 1 + p for i, hi in spans for p in range(lo, hi)]
            logits = self.head.logits(hidden[torch.tensor(rows, dtype=torch.long, device=dev)])
            live, at = [], 0
            for i, hi in spans:
                seq_logits = logits[at : at + hi - lo]
                at += hi - lo
                s = decodes[i].sampling
                n = hi - lo
                if s.temperature == 0:
                    drafted = seq_logits.argmax(dim=-1)
                    if threshold > 0:
                        top = torch.softmax(seq_logits, dim=-1).amax(dim=-1)
                        n, prefix_prob[i] = proposal_length(top, top, prefix_prob[i], threshold)
                else:
                    q = processed_probs(seq_logits, s.temperature, s.top_k, s.top_p)
                    drafted = sample(q, self._generator(decodes[i].seq_id, s))
                    probs[i] = q if probs[i] is None else torch.cat((probs[i], q))
                    if threshold > 0:
                        own = q.gather(1, drafted[:, None])[:, 0]
                        n, prefix_prob[i] = proposal_length(
                            own, q.amax(dim=-1), prefix_prob[i], threshold
                        )
                tokens[i, lo : lo + n] = drafted[:n]
                if n == hi - lo and hi < decodes[i].num_queries - 1:
                    live.append(i)
