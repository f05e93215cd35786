"""Shared fixtures: tiny random checkpoints written to disk by transformers (targets) and by
z-lab's own `DFlashDraftModel` (drafters), so our loaders read the real formats."""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# the metrics agent exports every second (default 10 s), so the metrics tests wait less
os.environ.setdefault("RAY_metrics_report_interval_ms", "1000")
# Serve's streaming settings, as the deployments run them (before anything imports ray.serve)
from dflash_ray.server import serve_env  # noqa: E402

serve_env.apply()

import pytest  # noqa: E402
import torch  # noqa: E402

# z-lab's whole block, verified at any batch size: the tiny random drafter is never confident
# enough for the CPU defaults' cut, and the tests count its accepted drafts (the device defaults
# have tests of their own, on the shipped pair)
WHOLE = {"spec_profile": "whole_block"}

torch.set_num_threads(1)

# Triton reads TRITON_INTERPRET once, when it is first imported (transformers and z-lab's dflash
# import it too), so it is set here, before any test module runs: without a CUDA device the
# kernels' parity tests run interpreted on CPU whichever test file runs first
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _import_hybrid_oracles_without_fla() -> None:
    """transformers' Qwen3.5 / Qwen3-Next modeling modules bind flash-linear-attention's kernels
    at import when `fla` imports, then call them on any device: on CPU that means fla under
    Triton's interpreter (whose chunked kernel cannot run there) instead of their torch code,
    which is the oracle the parity tests compare against. Imported first here with fla hidden,
    they keep their torch code for the session; fla itself stays importable afterwards
    (tests/test_fla_ops.py)."""
    import importlib.util
    import sys

    if importlib.util.find_spec("fla") is None:
        return
    loaded = {name: m for name, m in sys.modules.items() if name.split(".")[0] == "fla"}
    for name in loaded:
        del sys.modules[name]
    sys.modules["fla"] = None  # `import fla` raises ImportError while this is here
    try:
        for model in ("qwen3_5", "qwen3_5_moe", "qwen3_next"):
            importlib.import_module(f"transformers.models.{model}.modeling_{model}")
    finally:
        del sys.modules["fla"]
        sys.modules.update(loaded)


_import_hybrid_oracles_without_fla()

VOCAB = 32  # small on purpose: random drafters then match the target now and then
MASK_ID = VOCAB - 1


def _target_kwargs(**extra) -> dict:
    kw = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=512,
        eos_token_id=None,
    )
    kw.update(extra)
    return kw


def save_qwen3(path, seed: int = 0, **extra) -> str:
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    Qwen3ForCausalLM(Qwen3Config(**_target_kwargs(**extra))).save_pretrained(path)
    return str(path)


def save_qwen3_moe(path, seed: int = 0, **extra) -> str:
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(seed)
    kw = _target_kwargs(
        moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2, norm_topk_prob=True
    )
    kw.update(extra)
    Qwen3MoeForCausalLM(Qwen3MoeConfig(**kw)).save_pretrained(path)
    return str(path)


def _qwen35_kwargs(**extra) -> dict:
    """A 4-layer hybrid: three Gated DeltaNet layers then one gated full attention."""
    kw = _target_kwargs(
        linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=8,
        linear_value_head_dim=8, linear_conv_kernel_dim=4, initializer_range=0.1,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                         "partial_rotary_factor": 0.25},
    )
    kw.update(extra)
    return kw


def _randomize_norms(model) -> None:
    """transformers initialises the zero-centred norms to 0 and the DeltaNet's A/dt to fixed
    values: random ones, so a bug in how we read them shows."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("norm.weight", "A_log", "dt_bias")):
                p.copy_(torch.randn_like(p) * 0.3)


def save_qwen35(path, seed: int = 0, **extra) -> str:
    """A tiny random Qwen3.5-MoE (`Qwen3_5MoeForCausalLM`): routed experts + a shared one."""
    from transformers import Qwen3_5MoeForCausalLM, Qwen3_5MoeTextConfig

    torch.manual_seed(seed)
    kw = _qwen35_kwargs(moe_intermediate_size=32, shared_expert_intermediate_size=48,
                        num_experts=4, num_experts_per_tok=2)
    kw.pop("intermediate_size")
    kw.update(extra)
    model = Qwen3_5MoeForCausalLM(Qwen3_5MoeTextConfig(**kw))
    _randomize_norms(model)
    model.save_pretrained(path)
    return str(path)


def save_qwen35_dense(path, seed: int = 0) -> str:
    from transformers import Qwen3_5ForCausalLM, Qwen3_5TextConfig

    torch.manual_seed(seed)
    model = Qwen3_5ForCausalLM(Qwen3_5TextConfig(**_qwen35_kwargs()))
    _randomize_norms(model)
    model.save_pretrained(path)
    return str(path)


def save_qwen35_vl(path, seed: int = 0) -> str:
    """The multimodal checkpoint layout (`Qwen3_5MoeForConditionalGeneration`: the language
    model under `model.language_model.`, a vision tower beside it), a tiny vision config."""
    from transformers import Qwen3_5MoeConfig, Qwen3_5MoeForConditionalGeneration

    torch.manual_seed(seed)
    text = _qwen35_kwargs(moe_intermediate_size=32, shared_expert_intermediate_size=48,
                          num_experts=4, num_experts_per_tok=2)
    text.pop("intermediate_size")
    vision = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2,
                  out_hidden_size=64, patch_size=4, temporal_patch_size=1)
    model = Qwen3_5MoeForConditionalGeneration(
        Qwen3_5MoeConfig(text_config=text, vision_config=vision))
    _randomize_norms(model)
    model.save_pretrained(path)
    return str(path)


def save_qwen3_next(path, seed: int = 0, **extra) -> str:
    """A tiny random Qwen3-Next (`Qwen3NextForCausalLM`: fused DeltaNet input projections).
    Every other layer a dense MLP (`decoder_sparse_step` 2) wider than the shared expert, and
    no top-k renormalisation, so the switches Qwen3.5 lacks are read."""
    from transformers import Qwen3NextConfig, Qwen3NextForCausalLM

    torch.manual_seed(seed)
    kw = _qwen35_kwargs(intermediate_size=96, moe_intermediate_size=32,
                        shared_expert_intermediate_size=48, num_experts=4, num_experts_per_tok=2,
                        decoder_sparse_step=2, norm_topk_prob=False)
    kw.update(extra)
    model = Qwen3NextForCausalLM(Qwen3NextConfig(**kw))
    _randomize_norms(model)
    model.save_pretrained(path)
    return str(path)


def save_drafter(path, seed: int = 1, block_size: int = 8, layer_ids=(1, 2), **extra) -> str:
    """A random drafter in z-lab's format, written by z-lab's own class."""
    from dflash import DFlashDraftModel
    from transformers import Qwen3Config

    torch.manual_seed(seed)
    kw = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=512,
        initializer_range=0.2,
    )
    kw.update(extra)
    cfg = Qwen3Config(**kw)
    cfg.architectures = ["DFlashDraftModel"]
    cfg.block_size = block_size
    cfg.num_target_layers = 4
    cfg.dflash_config = {"target_layer_ids": list(layer_ids), "mask_token_id": MASK_ID}
    DFlashDraftModel(cfg).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """Paths of tiny checkpoints: dense and MoE targets, a Qwen3.5-MoE hybrid, and a drafter
    that fits them all."""
    root = tmp_path_factory.mktemp("tiny")
    return {
        "qwen3": save_qwen3(root / "qwen3"),
        "moe": save_qwen3_moe(root / "moe"),
        "qwen35": save_qwen35(root / "qwen35"),
        "drafter": save_drafter(root / "drafter"),
    }


@pytest.fixture(scope="session")
def llms(tiny):
    """Long-lived engines (plain and DFlash) on the tiny MoE target, shared by tests."""
    from dflash_ray import LLM

    return {
        "plain": LLM(tiny["moe"]),
        # fp32 drafters: which of the random drafter's drafts get accepted, which some tests
        # count on, does not then depend on the machine's bf16 GEMM ("auto" is per machine)
        "dflash": LLM(tiny["moe"], tiny["drafter"], drafter_dtype="float32", **WHOLE),
        # a bf16 drafter beside the fp32 target (what "auto" picks on a CPU with native bf16)
        "dflash_bf16": LLM(tiny["moe"], tiny["drafter"], drafter_dtype="bfloat16", **WHOLE),
        # proposes only the drafts the (random) drafter is confident in: mostly 0-2 of 7
        "dflash_cut": LLM(tiny["moe"], tiny["drafter"], spec_min_confidence=0.02,
                          drafter_dtype="float32", **WHOLE),
        # the engines above sample with the coupled rule (the default); this one with
        # speculative rejection sampling
        "dflash_rejection": LLM(tiny["moe"], tiny["drafter"], drafter_dtype="float32",
                                sampling="rejection", **WHOLE),
    }


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray cluster for the whole session (starting one costs ~5 s and 0.5 GB)."""
    import ray

    if not ray.is_initialized():
        # DFLASH_NODE_IP: the sockets our actors and replicas open for peers listen on loopback
        ray.init(num_cpus=6, include_dashboard=False, logging_level="ERROR",
                 runtime_env={"env_vars": {"OMP_NUM_THREADS": "1",
                                           "DFLASH_NODE_IP": "127.0.0.1"}})
    yield ray
    try:
        from ray import serve

        serve.shutdown()
    finally:
        ray.shutdown()
