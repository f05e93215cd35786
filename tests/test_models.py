"""Our target code against transformers' own Qwen3 / Qwen3-MoE on the same checkpoint (fp32)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from dflash_ray.models.layers import prepack
from dflash_ray.models.qwen3 import Qwen3Target
from dflash_ray.ops import PackedWeight, can_pack
from dflash_ray.ops.cpu_packed import gemm_rows
from dflash_ray.ops.reference import moe_experts
from dflash_ray.worker.caches import PagedKVCache
from dflash_ray.worker.layout import SeqSpan, build_layout, drafter_layout

from .conftest import VOCAB, save_drafter, save_qwen3, save_qwen3_moe

BLOCK = 4  # small KV pages so sequences span several, out of order


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


class Harness:
    """Our model + a paged cache, fed step by step like the engine does."""

    def __init__(self, path: str, dtype: torch.dtype = torch.float32):
        self.model = Qwen3Target.from_pretrained(path, dtype)
        d = self.model.cfg.decoder
        self.cache = PagedKVCache(
            d.num_layers, 64, BLOCK, self.model.num_kv_heads, d.head_dim, dtype, "cpu"
        )
        self.free = list(range(63, -1, -1))
        self.tables: dict[int, list[int]] = {}
        self.lens: dict[int, int] = {}

    @torch.no_grad()
    def forward(self, chunks: dict[int, list[int]], capture=None):
        """chunks: seq -> new tokens. Returns (logits per seq, features per seq)."""
        spans, ids, pos = [], [], []
        for sid, toks in chunks.items():
            start = self.lens.get(sid, 0)
            table = self.tables.setdefault(sid, [])
            while len(table) * BLOCK < start + len(toks):
                table.append(self.free.pop())
            spans.append(SeqSpan(table, start, len(toks), len(toks)))
            ids += toks
            pos += range(start, start + len(toks))
            self.lens[sid] = start + len(toks)
        ws, groups = build_layout(spans, BLOCK, causal=True, device="cpu")
        h, f = self.model(torch.tensor(ids), torch.tensor(pos), self.cache, ws, groups, capture)
        logits = self.model.logits(h)
        out, feats, i = {}, {}, 0
        for sid, toks in chunks.items():
            out[sid] = logits[i : i + len(toks)]
            feats[sid] = None if f is None else f[i : i + len(toks)]
            i += len(toks)
        return out, feats


@pytest.fixture(scope="module", params=["qwen3", "moe"])
def pair(request, tiny):
    path = tiny[request.param]
    ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return path, ref


def test_prefill_and_incremental_logits_match_transformers(pair):
    path, ref = pair
    h = Harness(path)
    g = torch.Generator().manual_seed(0)
    a = torch.randint(0, VOCAB, (13,), generator=g).tolist()
    b = torch.randint(0, VOCAB, (5,), generator=g).tolist()
    # two sequences of different lengths in one ragged forward, then incremental steps
    logits, _ = h.forward({0: a, 1: b})
    steps = [{0: [3], 1: [7, 8, 9]}, {0: [1, 2, 3, 4], 1: [5]}, {1: [6]}]
    full = {0: list(a), 1: list(b)}
    with torch.no_grad():
        for sid in (0, 1):
            want = ref(torch.tensor([full[sid]])).logits[0]
            assert rel_err(logits[sid], want) < 1e-5
        for chunk in steps:
            got, _ = h.forward(chunk)
            for sid, toks in chunk.items():
                full[sid] += toks
                want = ref(torch.tensor([full[sid]])).logits[0, -len(toks) :]
                assert rel_err(got[sid], want) < 1e-5


def test_rollback_then_continue_matches_fresh_forward(pair):
    """Verify a block, forget the rejected tail, continue: logits equal the plain sequence's."""
    path, ref = pair
    h = Harness(path)
    prompt = [1, 5, 9, 2, 6]
    h.forward({0: prompt})
    h.forward({0: [4, 11, 12, 13, 14, 15]})  # block; suppose 2 drafts + bonus accepted
    h.lens[0] = len(prompt) + 3
    got, _ = h.forward({0: [20, 21]})  # rejected positions get overwritten
    seq = prompt + [4, 11, 12, 20, 21]
    with torch.no_grad():
        want = ref(torch.tensor([seq])).logits[0, -2:]
    assert rel_err(got[0], want) < 1e-5


def test_captured_features_are_hf_hidden_states(pair):
    path, ref = pair
    h = Harness(path)
    toks = [3, 1, 4, 1, 5, 9, 2, 6]
    _, feats = h.forward({0: toks}, capture=[0, 2, 3])
    with torch.no_grad():
        hs = ref(torch.tensor([toks]), output_hidden_states=True).hidden_states
    want = torch.cat([hs[1][0], hs[3][0], hs[4][0]], dim=-1)  # HF index = layer + 1
    assert rel_err(feats[0], want) < 1e-5


def test_sharded_checkpoint_and_tied_embeddings(tmp_path):
    path = tmp_path / "sharded"
    from transformers import Qwen3ForCausalLM

    save_qwen3(tmp_path / "whole", tie_word_embeddings=True)
    ref = AutoModelForCausalLM.from_pretrained(tmp_path / "whole", dtype=torch.float32).eval()
    assert isinstance(ref, Qwen3ForCausalLM)
    ref.save_pretrained(path, max_shard_size="100KB")
    assert (path / "model.safetensors.index.json").is_file()
    h = Harness(str(path))
    toks = [2, 7, 1, 8, 2, 8]
    got, _ = h.forward({0: toks})
    with torch.no_grad():
        want = ref(torch.tensor([toks])).logits[0]
    assert rel_err(got[0], want) < 1e-5


def test_moe_dense_layers_follow_decoder_sparse_step(tmp_path):
    path = save_qwen3_moe(tmp_path / "mixed", decoder_sparse_step=2, mlp_only_layers=[3])
    model = Qwen3Target.from_pretrained(path)
    kinds = [type(layer.mlp).__name__ for layer in model.layers]
    assert kinds == ["MLP", "SparseMoE", "MLP", "MLP"]
    ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    h = Harness(path)
    toks = [5, 6, 7, 8, 9]
    got, _ = h.forward({0: toks})
    with torch.no_grad():
        assert rel_err(got[0], ref(torch.tensor([toks])).logits[0]) < 1e-5


@pytest.mark.parametrize("num_tokens", [1, 3, 40])
def test_moe_gather_and_loop_paths_agree_with_dense_sum(num_tokens):
    torch.manual_seed(0)
    e, hdim, inter, k = 6, 16, 8, 2
    x = torch.randn(num_tokens, hdim)
    gate_up, down = torch.randn(e, 2 * inter, hdim), torch.randn(e, hdim, inter)
    weights = torch.rand(num_tokens, k)
    ids = torch.stack([torch.randperm(e)[:k] for _ in range(num_tokens)])
    want = torch.zeros(num_tokens, hdim)
    for t in range(num_tokens):
        for j in range(k):
            g, u = (gate_up[ids[t, j]] @ x[t]).chunk(2)
            want[t] += weights[t, j] * (down[ids[t, j]] @ (torch.nn.functional.silu(g) * u))
    assert rel_err(moe_experts(x, gate_up, down, weights, ids), want) < 1e-5
    # expert parallel: two ranks holding experts [0, 4) and [4, 6) sum to the whole
    lo = moe_experts(x, gate_up[:4], down[:4], weights, ids, 0)
    hi = moe_experts(x, gate_up[4:], down[4:], weights, ids, 4)
    assert rel_err(lo + hi, want) < 1e-5


needs_onednn = pytest.mark.skipif(not can_pack(torch.ones(1)), reason="no oneDNN CPU path")


def test_packed_gemms_run_at_a_bounded_set_of_row_counts():
    """Every row count maps to a bucket at least as large, exact up to 8, under 1.25x up to 64
    and under 1.125x above, so ragged batches build few oneDNN primitives: 68 shapes a weight
    up to 4096 rows."""
    buckets = [gemm_rows(m) for m in range(1, 4097)]
    assert buckets[:8] == list(range(1, 9)) and gemm_rows(0) == 0
    assert all(m <= b < (1.25 if m <= 64 else 1.125) * m for m, b in enumerate(buckets, 1))
    assert buckets == sorted(buckets) and len(set(buckets)) == 68
    assert [gemm_rows(m) for m in (9, 10, 11, 17, 33, 65, 100)] == [10, 10, 12, 20, 40, 72, 104]


@needs_onednn
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_padded_packed_gemm_returns_only_its_rows(dtype):
    """Row counts between buckets (and a leading batch dim) give F.linear's values and shape."""
    torch.manual_seed(0)
    w, bias = torch.randn(24, 16).to(dtype), torch.randn(24).to(dtype)
    packed = PackedWeight(w)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for shape in ((9, 16), (13, 16), (17, 16), (3, 7, 16), (2, 16)):
        x = torch.randn(shape).to(dtype)
        got = packed.apply(x, bias)
        want = torch.nn.functional.linear(x.float(), w.float(), bias.float())
        assert got.shape == (*shape[:-1], 24)
        assert rel_err(got.float(), want) < tol


@needs_onednn
def test_fp32_weights_that_bf16_holds_are_widened_bit_for_bit():
    """An fp32 weight whose values bf16 holds exactly (a bf16 checkpoint loaded in fp32) is kept
    in bf16 and widened before each GEMM: F.linear's values bit for bit, at every row count,
    with and without bias, for a view into a stacked tensor (an expert) too."""
    torch.manual_seed(0)
    stacked = torch.randn(3, 40, 24).bfloat16().float()
    bias = torch.randn(40).bfloat16().float()
    for w in (stacked[1], torch.randn(24, 16).bfloat16().float()):
        packed = PackedWeight(w)
        assert packed.widened and packed.data.dtype == torch.bfloat16
        for shape in ((1, w.shape[1]), (2, w.shape[1]), (9, w.shape[1]), (3, 5, w.shape[1])):
            x = torch.randn(shape)
            for b in (None, bias[: w.shape[0]]):
                assert torch.equal(packed.apply(x, b), torch.nn.functional.linear(x, w, b))


@needs_onednn
def test_weights_bf16_does_not_hold_or_too_large_stay_in_onednns_layout():
    """Widening is for fp32 weights that bf16 holds exactly and that are small enough for the
    widened copy to stay in cache (`WIDEN_MAX_ELEMENTS`); others keep oneDNN's layout."""
    from dflash_ray.ops.cpu_packed import WIDEN_MAX_ELEMENTS

    torch.manual_seed(0)
    exact = torch.randn(64, 32).bfloat16().float()
    inexact = exact.clone()
    inexact[3, 5] += 2.0**-20  # one value bf16 cannot hold
    large = torch.randn(WIDEN_MAX_ELEMENTS // 64 + 1, 64).bfloat16().float()
    assert PackedWeight(exact).widened
    for w in (inexact, large, exact.bfloat16()):
        packed = PackedWeight(w)
        assert not packed.widened and packed.data.dtype == w.dtype and packed.data.is_mkldnn


@needs_onednn
def test_widened_weights_from_two_threads_keep_their_own_buffers():
    """The buffer a weight widens into is per thread: two threads running GEMMs of one shape
    over different weights at once each get their own weight's products."""
    import threading

    torch.manual_seed(0)
    weights = [PackedWeight(torch.randn(48, 32).bfloat16().float()) for _ in range(2)]
    x = torch.randn(4, 32)
    want = [torch.nn.functional.linear(x, p.source) for p in weights]
    wrong = []

    def run(i: int) -> None:
        for _ in range(2000):
            if not torch.equal(weights[i].apply(x, None), want[i]):
                wrong.append(i)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not wrong


@needs_onednn
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_weights_give_the_reference_logits(tiny, dtype):
    """The engine packs linear weights for oneDNN on CPU; prefill, a verify-sized chunk and a
    single-token step must give the unpacked model's logits (the MoE hits several experts)."""
    ref, packed = Harness(tiny["moe"], dtype), Harness(tiny["moe"], dtype)
    assert prepack(packed.model)
    assert isinstance(packed.model.lm_head.packed, PackedWeight)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for chunks in ({0: [5, 9, 2, 7, 1, 4, 4], 1: [3, 8]}, {0: [6, 2, 9, 1, 7], 1: [2]}, {0: [1]}):
        want, _ = ref.forward(chunks)
        got, _ = packed.forward(chunks)
        for sid in chunks:
            assert rel_err(got[sid].float(), want[sid].float()) < tol


@needs_onednn
def test_moe_experts_on_packed_weights():
    torch.manual_seed(0)
    x, gate_up, down = torch.randn(5, 16), torch.randn(6, 16, 16), torch.randn(6, 16, 8)
    weights, ids = torch.rand(5, 2), torch.stack([torch.randperm(6)[:2] for _ in range(5)])
    want = moe_experts(x, gate_up, down, weights, ids)
    got = moe_experts(x, [PackedWeight(w) for w in gate_up], [PackedWeight(w) for w in down],
                      weights, ids)
    assert rel_err(got, want) < 1e-5


@needs_onednn
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_drafter_matches_reference(tiny, dtype):
    """Context K/V (the drafter's separately packed k/v rows), cache contents and block hidden
    states agree packed vs unpacked."""
    from dflash_ray.models.dflash import DFlashDrafter

    gen = torch.Generator().manual_seed(0)
    results = []
    for pack in (False, True):
        m = DFlashDrafter.from_pretrained(tiny["drafter"], dtype)
        if pack:
            assert prepack(m)
            assert m.layers[0].self_attn.kv_packed is not None and m.fc.packed is not None
        d = m.cfg.decoder
        cache = PagedKVCache(d.num_layers, 4, BLOCK, d.num_kv_heads, d.head_dim, dtype, "cpu")
        gen.manual_seed(0)
        feats = torch.randn(6, m.fc.in_features, generator=gen).to(dtype)
        block = torch.randn(8, d.hidden_size, generator=gen).to(dtype)
        with torch.inference_mode():
            m.materialize_context(feats, torch.arange(6), torch.arange(6), cache)
            ws, groups = drafter_layout([SeqSpan([0, 1, 2, 3], 6, 8, 8)], BLOCK,
                                        m.attention_kinds(), "cpu")
            hidden = m(block, torch.arange(6, 14), cache, ws, groups)
        results.append((hidden.float(), [t.float().clone() for t in cache.layer(0)]))
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    (want, want_kv), (got, got_kv) = results
    assert rel_err(got, want) < tol
    for g, w in zip(got_kv, want_kv, strict=True):
        assert rel_err(g[:14], w[:14]) < tol


def test_registry_covers_every_parsed_architecture_and_refuses_unknown_layer_kinds(tmp_path):
    import json
    import shutil

    from dflash_ray.models.hf_config import TARGET_ARCHITECTURES
    from dflash_ray.models.registry import TARGETS, load_target

    assert set(TARGETS) == set(TARGET_ARCHITECTURES)
    path = save_qwen3(tmp_path / "q")
    model = load_target(path, torch.float32, "cpu")
    assert [type(s).__name__ for s in model.cache_specs()] == ["AttentionCacheSpec"] * 4
    hybrid = tmp_path / "hybrid"
    shutil.copytree(path, hybrid)
    cfg = json.loads((hybrid / "config.json").read_text())
    cfg["layer_types"] = ["linear_attention", "linear_attention", "linear_attention",
                          "full_attention"]
    (hybrid / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="layer 0 is 'linear_attention'"):
        load_target(str(hybrid), torch.float32, "cpu")


def test_layout_window_masks():
    """Keys a query sees under a window of 3: at positions 0..5, queries at 3..5 (the last three
    new tokens of six), causal and not."""
    (g,) = build_layout([SeqSpan([0, 1], 0, 6, 3)], BLOCK, causal=True, device="cpu",
                        window=3)[1]
    assert g.mask[0, 0].int().tolist() == [[0, 1, 1, 1, 0, 0], [0, 0, 1, 1, 1, 0],
                                           [0, 0, 0, 1, 1, 1]]
    (g,) = build_layout([SeqSpan([0, 1], 0, 6, 3)], BLOCK, causal=False, device="cpu",
                        window=3)[1]
    assert g.mask[0, 0].int().tolist() == [[0, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1],
                                           [0, 0, 0, 1, 1, 1]]
    (g,) = build_layout([SeqSpan([0, 1], 0, 6, 3)], BLOCK, causal=True, device="cpu")[1]
    assert g.mask[0, 0].int().tolist() == [[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 0],
                                           [1, 1, 1, 1, 1, 1]]


def _drafter_dir(tmp_path, **changes) -> str:
    import json

    path = save_drafter(tmp_path / "d", num_hidden_layers=2)
    cfg = json.loads((tmp_path / "d" / "config.json").read_text())
    cfg.update(changes)
    (tmp_path / "d" / "config.json").write_text(json.dumps(cfg))
    return path


@pytest.mark.parametrize(("changes", "message"), [
    ({"layer_types": ["full_attention", "chunked_attention"]},
     r"layer_types \{1: 'chunked_attention'\}"),
    ({"layer_types": ["sliding_attention", "full_attention"], "use_sliding_window": True,
      "sliding_window": None}, "but sliding_window None"),
    ({"layer_types": ["sliding_attention", "full_attention"], "use_sliding_window": True,
      "sliding_window": 0}, "but sliding_window 0"),
    ({"causal": True}, "drafter causal is True"),
    ({"layer_types": ["sliding_attention", "full_attention"], "use_sliding_window": True,
      "sliding_window": 8, "dflash_config": {"causal": False, "mask_token_id": 31}},
     "dflash_config.causal is False"),
])
def test_drafter_attention_config_errors_name_the_value(tmp_path, changes, message):
    from dflash_ray.models.hf_config import DrafterConfig

    with pytest.raises(ValueError, match=message):
        DrafterConfig.load(_drafter_dir(tmp_path, **changes))


def test_drafter_attention_kinds_follow_zlab(tmp_path, caplog):
    from dflash_ray.models.hf_config import FULL, AttentionKind, DrafterConfig

    swa = {"layer_types": ["sliding_attention", "full_attention"], "sliding_window": 8}
    kinds = DrafterConfig.load(_drafter_dir(tmp_path, use_sliding_window=True, **swa))
    assert kinds.layer_attention == (AttentionKind(True, 8), FULL)
    kinds = DrafterConfig.load(_drafter_dir(tmp_path, use_sliding_window=True, is_causal=True,
                                            **swa))
    assert kinds.layer_attention == (AttentionKind(True, 8), AttentionKind(True, None))
    # transformers' Qwen3Config (z-lab's config class) drops the window unless
    # use_sliding_window: the layer stays causal, over every key, and the log says so
    # (once a process: every worker that loads the drafter reads its config)
    from dflash_ray.models import hf_config

    hf_config._warn_window_off.cache_clear()
    with caplog.at_level("WARNING"):
        kinds = DrafterConfig.load(_drafter_dir(tmp_path, use_sliding_window=False, **swa))
        DrafterConfig.load(_drafter_dir(tmp_path, use_sliding_window=False, **swa))
    assert kinds.layer_attention == (AttentionKind(True, None), FULL)
    assert caplog.text.count("sliding_window 8 is off") == 1
    assert DrafterConfig.load(_drafter_dir(tmp_path)).layer_attention == (FULL, FULL)
