"""The drafter side of a step: the DFlash drafter, its paged KV cache and the target's embedding
and LM head, on one device.

One public step method, `draft(batch, features)`: take in the target features of the tokens the
followed sequences committed since its last pass (written into its cache once), then one
pass over their blocks `[bonus, MASK...]` proposes drafts. It keeps no state per
sequence (its random draws are seeded per position, see `sampler`), and knows nothing of the
target's weights beyond the two tensors it borrows, so it runs beside the target
(`LocalExecutor`) or alone in a Ray actor.
"""

from __future__ import annotations

import torch
from torch import nn

from ..core.step_io import DecodeItem, StepBatch
from ..models.hf_config import TargetConfig
from ..models.layers import Linear, embedding, prepack
from ..models.loader import load_weights
from ..models.registry import load_drafter
from ..spec_decode import processed_probs, sample
from . import heap
from .caches import ModelCache, bytes_per_token
from .drafts import NO_DRAFT, Drafts
from .graph_pass import SCRATCH_BLOCKS, GraphedPass, graph_mode
from .graphs import GraphShape, attention_group, pad_spans, padded_ids, widened
from .layout import SeqSpan, drafter_layout, slot_mapping
from .sampler import coupled_draw, generator
from .trace import traced
from .worker_config import ModelSpec, WorkerConfig

PROPOSE_CHUNK = 4  # block positions whose logits are computed together under a threshold


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


class TargetHead(nn.Module):
    """The target's token embedding and LM head: all a drafter needs of the target. Loaded alone
    (two tensors read from the target checkpoint) where the target lives in another process."""

    def __init__(self, cfg: TargetConfig):
        super().__init__()
        hidden = cfg.decoder.hidden_size
        self.embed_tokens = embedding(cfg.vocab_size, hidden)
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
    role = "drafter"

    def __init__(self, cfg: WorkerConfig, spec: ModelSpec, head: nn.Module | None = None):
        """`head` provides `embed` and `logits` (the in-process target itself), borrowed when
        the drafter runs in the target's dtype; otherwise the drafter loads its own copy of the
        target's embedding and LM head from `cfg.target`, in its dtype."""
        self.cfg, self.spec = cfg, spec
        heap.setup()  # before the first step's tensors (see worker/heap.py)
        self.device = torch.device(cfg.device)
        self.dtype = cfg.drafter_torch_dtype
        self.drafter = load_drafter(cfg.drafter, self.dtype, self.device)
        borrow = head is not None and self.dtype == cfg.torch_dtype
        self.head = head if borrow else TargetHead.from_pretrained(
            cfg.target, self.dtype, self.device
        )
        prepack(self.drafter)
        if not borrow:  # an in-process target packs itself
            prepack(self.head)
        self.cache: ModelCache | None = None
        # the block pass, padded to its bucket (`graph_pass`); the drafter's attention-only
        # layers have nothing that refuses a graph
        mode = graph_mode(cfg.cuda_graphs, self.device, lambda capture: None, "drafter")
        self.graphs = GraphedPass("drafter", mode, cfg.cuda_graph_max_batch, spec.max_position,
                                  self._graph_layout, self._graph_forward)
        self._kinds = self.drafter.attention_kinds()
        self._scratch_block: int | None = None

    def kv_bytes_per_token(self) -> int:
        return bytes_per_token(self.drafter.cache_specs(), self.dtype)

    def allocate(self, num_blocks: int) -> None:
        """`num_blocks` KV blocks (the block manager's ids), plus the graphs' scratch block
        (id num_blocks, see `TargetWorker.allocate`)."""
        extra = SCRATCH_BLOCKS if self.graphs.active else 0
        self._scratch_block = num_blocks
        self.cache = ModelCache(self.drafter.cache_specs(), num_blocks + extra,
                                self.cfg.kv_block_len, self.dtype, self.device)

    @traced
    @torch.inference_mode()
    def draft(self, batch: StepBatch, features: torch.Tensor) -> Drafts:
        """Drafts for every decode of the batch (rows of the ones the drafter does not take
        part in are NO_DRAFT). `features` [rows, K*H], in the target's dtype: the waiting
        context of the drafter's decodes (`batch.drafter_decodes()`), concatenated in order."""
        heap.tick()
        dev, blen = self.device, self.cfg.kv_block_len
        mine = batch.drafter_decodes()
        decodes = [batch.decodes[i] for i in mine]
        # 1. Context K/V of the tokens committed since the last draft pass, written once.
        ctx_spans = [SeqSpan(d.block_table, d.drafted_ctx, d.context_rows, 0) for d in decodes]
        ctx_pos = torch.tensor(
            [p for s in ctx_spans for p in range(s.num_cached, s.num_cached + s.num_new)],
            dtype=torch.long,
            device=dev,
        )
        if features.shape[0] != ctx_pos.shape[0]:
            raise RuntimeError(f"{features.shape[0]} feature rows for {ctx_pos.shape[0]} context "
                               "positions")
        self.drafter.materialize_context(
            features.to(self.dtype), ctx_pos, slot_mapping(ctx_spans, blen, dev), self.cache
        )
        # 2. One pass over every block [bonus, MASK, ...] of the decodes with q > 1 (q = 1: this
        # pass only takes in the context; see StepBatch.drafter_pass), each layer with the masks
        # of its kind (non-causal for full attention, causal + window for sliding).
        n = len(batch.decodes)
        tokens = torch.full((n, self.spec.block_size - 1), NO_DRAFT, dtype=torch.long, device=dev)
        probs: list[torch.Tensor | None] = [None] * n
        drafting = [i for i in mine if batch.decodes[i].num_queries > 1]
        q_lens = [d.num_queries for d in batch.decodes]
        if not drafting:
            return Drafts.of(tokens, probs, q_lens)
        spans = [SeqSpan(batch.decodes[i].block_table, batch.decodes[i].start,
                         batch.decodes[i].num_queries, batch.decodes[i].num_queries)
                 for i in drafting]
        ids, pos = [], []
        for i in drafting:
            d = batch.decodes[i]
            ids += [d.bonus] + [self.spec.mask_token_id] * (d.num_queries - 1)
            pos += range(d.start, d.start + d.num_queries)
        hidden = self.graphs.run(spans, ids, pos)
        if hidden is None:
            write_slots, groups = drafter_layout(spans, blen, self._kinds, dev)
            ids_t = torch.tensor(ids, dtype=torch.long, device=dev)
            pos_t = torch.tensor(pos, dtype=torch.long, device=dev)
            hidden = self.drafter(self.head.embed(ids_t), pos_t, self.cache, write_slots, groups)
        # 3. Drafts at block positions 1..q-1 from the target's LM head.
        self._propose(batch.decodes, drafting, hidden, tokens, probs)
        return Drafts.of(tokens, probs, q_lens)

    def _graph_layout(self, spans: list[SeqSpan], ids: list[int], pos: list[int],
                      shape: GraphShape) -> dict[str, torch.Tensor]:
        """A block pass padded to `shape`: one widened attention group per kind of layer."""
        blen = self.cfg.kv_block_len
        padded = pad_spans(spans, shape, self._scratch_block, blen)
        write_slots, groups = drafter_layout(padded, blen, self._kinds, self.device)
        inputs = {**padded_ids(spans, ids, pos, shape, self.device), "write_slots": write_slots}
        for j, kind in enumerate(self._kinds):
            (g,) = groups[kind]
            inputs.update(widened(g, shape, self._scratch_block * blen, tag=f".{j}"))
        return inputs

    def _graph_forward(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """The block pass over a padded step: [bucket * q, H]."""
        groups = {kind: [attention_group(inputs, f".{j}")] for j, kind in enumerate(self._kinds)}
        return self.drafter(self.head.embed(inputs["input_ids"]), inputs["positions"], self.cache,
                            inputs["write_slots"], groups)

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
        gens = {i: generator(decodes[i].sampling, decodes[i].start, "drafter", dev)
                for i in drafting if decodes[i].sampling.needs_draft_probs}
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
                if s.greedy:
                    drafted = seq_logits.argmax(dim=-1)
                    if threshold > 0:
                        top = torch.softmax(seq_logits, dim=-1).amax(dim=-1)
                        n, prefix_prob[i] = proposal_length(top, top, prefix_prob[i], threshold)
                else:
                    q = processed_probs(seq_logits, s.temperature, s.top_k, s.top_p)
                    if s.coupled:  # the target's noise of the rows that verify these drafts
                        drafted = coupled_draw(q, s, decodes[i].start + lo)
                    else:  # rejection sampling reads q
                        drafted = sample(q, gens[i])
                        probs[i] = q if probs[i] is None else torch.cat((probs[i], q))
                    if threshold > 0:
                        own = q.gather(1, drafted[:, None])[:, 0]
                        n, prefix_prob[i] = proposal_length(
                            own, q.amax(dim=-1), prefix_prob[i], threshold
                        )
                tokens[i, lo : lo + n] = drafted[:n]
                if n == hi - lo and hi < decodes[i].num_queries - 1:
                    live.append(i)
