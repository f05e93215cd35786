"""Model configs read from Hugging Face / z-lab `config.json` files, validated at load.

Owns: which architectures we support, the defaults of keys a checkpoint may omit, and the checks
that a drafter fits its target. Does not own weights (see `loader.py`).
"""

from __future__ import annotations

import functools
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

TARGET_ARCHITECTURES = {
    "Qwen3ForCausalLM": "qwen3",
    "Qwen3MoeForCausalLM": "qwen3_moe",
    # hybrids: Gated DeltaNet layers with a gated full-attention layer every few
    "Qwen3_5ForCausalLM": "qwen3_5",
    "Qwen3_5ForConditionalGeneration": "qwen3_5",
    "Qwen3_5MoeForCausalLM": "qwen3_5_moe",
    "Qwen3_5MoeForConditionalGeneration": "qwen3_5_moe",
    # the same layer kinds, fused DeltaNet input projections (split at load, `qwen3_next.py`)
    "Qwen3NextForCausalLM": "qwen3_next",
}
# config.json `model_type` -> architecture, for exports that name their class otherwise
MODEL_TYPES = {
    "qwen3": "Qwen3ForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
    "qwen3_5_text": "Qwen3_5ForCausalLM",
    "qwen3_5": "Qwen3_5ForConditionalGeneration",
    "qwen3_5_moe_text": "Qwen3_5MoeForCausalLM",
    "qwen3_5_moe": "Qwen3_5MoeForConditionalGeneration",
    "qwen3_next": "Qwen3NextForCausalLM",
}
HYBRID_FAMILIES = {"qwen3_5", "qwen3_5_moe", "qwen3_next"}
MOE_FAMILIES = {"qwen3_moe", "qwen3_5_moe", "qwen3_next"}
DRAFTER_ARCHITECTURES = {"DFlashDraftModel"}


def read_config(model_dir: str | Path) -> dict:
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise ValueError(f"model directory {str(model_dir)!r} has no config.json")
    return json.loads(path.read_text())


def _rope(cfg: dict) -> tuple[float, float]:
    """(theta, linear scaling factor) from either the transformers-5 `rope_parameters` or the
    older `rope_theta` + `rope_scaling` keys."""
    params = cfg.get("rope_parameters") or {}
    scaling = cfg.get("rope_scaling") or {}
    theta = float(params.get("rope_theta", cfg.get("rope_theta", 10000.0)))
    rope_type = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type")
    rope_type = rope_type or "default"
    if rope_type == "default":
        return theta, 1.0
    if rope_type == "linear":
        return theta, float(params.get("factor", scaling.get("factor", 1.0)))
    raise ValueError(f"rope_type {rope_type!r} is not supported (supported: default, linear)")


@dataclass(slots=True)
class DecoderConfig:
    """The Qwen3 decoder-stack shape shared by targets and drafters."""

    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: float
    max_position: int
    attention_bias: bool
    # per layer: "full_attention", "linear_attention" (Gated DeltaNet, hybrid targets only) or
    # "sliding_attention" (drafters only, see `AttentionKind`); empty means all full attention
    layer_types: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.layer_types:
            self.layer_types = ("full_attention",) * self.num_layers
        if len(self.layer_types) != self.num_layers:
            raise ValueError(f"layer_types has {len(self.layer_types)} entries for "
                             f"num_hidden_layers {self.num_layers}")

    @classmethod
    def from_dict(cls, cfg: dict) -> DecoderConfig:
        theta, scaling = _rope(cfg)
        heads = int(cfg["num_attention_heads"])
        return cls(
            hidden_size=int(cfg["hidden_size"]),
            # a Qwen3.5-MoE has no dense MLP: its shared expert takes that place (and share)
            intermediate_size=int(cfg.get("intermediate_size")
                                  or cfg.get("shared_expert_intermediate_size") or 0),
            num_layers=int(cfg["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
            head_dim=int(cfg.get("head_dim") or int(cfg["hidden_size"]) // heads),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=theta,
            rope_scaling=scaling,
            max_position=int(cfg.get("max_position_embeddings", 32768)),
            attention_bias=bool(cfg.get("attention_bias", False)),
            layer_types=tuple(cfg.get("layer_types") or ()),
        )


@dataclass(slots=True)
class LinearAttentionConfig:
    """Gated DeltaNet shape of a hybrid target (Qwen3.5) and its gated full attention."""

    num_k_heads: int
    num_v_heads: int
    k_head_dim: int
    v_head_dim: int
    conv_kernel: int
    partial_rotary_factor: float  # of the full-attention head dim that RoPE rotates
    attn_output_gate: bool  # full attention's q_proj also yields a sigmoid gate per head

    @property
    def conv_dim(self) -> int:
        return 2 * self.num_k_heads * self.k_head_dim + self.num_v_heads * self.v_head_dim

    @classmethod
    def from_dict(cls, cfg: dict) -> LinearAttentionConfig:
        rope = cfg.get("rope_parameters") or {}
        return cls(
            num_k_heads=int(cfg["linear_num_key_heads"]),
            num_v_heads=int(cfg["linear_num_value_heads"]),
            k_head_dim=int(cfg["linear_key_head_dim"]),
            v_head_dim=int(cfg["linear_value_head_dim"]),
            conv_kernel=int(cfg.get("linear_conv_kernel_dim", 4)),
            partial_rotary_factor=float(
                rope.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 0.25))),
            attn_output_gate=bool(cfg.get("attn_output_gate", True)),
        )


def _text_config(cfg: dict) -> dict:
    """A multimodal checkpoint's language-model config (`text_config`), with the outer keys it
    inherits; the config itself otherwise."""
    text = cfg.get("text_config")
    if not text:
        return cfg
    merged = {k: v for k, v in cfg.items() if k != "text_config"}
    merged.update(text)
    merged.setdefault("tie_word_embeddings", cfg.get("tie_word_embeddings", False))
    return merged


def _hybrid_layer_types(cfg: dict) -> list[str]:
    """`layer_types`, or the pattern `full_attention_interval` (default 4) describes: every
    interval-th layer full attention, the others linear attention."""
    if cfg.get("layer_types"):
        return list(cfg["layer_types"])
    every = int(cfg.get("full_attention_interval", 4))
    return ["full_attention" if (i + 1) % every == 0 else "linear_attention"
            for i in range(int(cfg["num_hidden_layers"]))]


@dataclass(slots=True)
class TargetConfig:
    architecture: str  # the checkpoint's class name, e.g. "Qwen3MoeForCausalLM"
    arch: str  # its family: "qwen3" | "qwen3_moe"
    decoder: DecoderConfig
    vocab_size: int
    tie_word_embeddings: bool
    eos_token_ids: list[int]
    # MoE only
    num_experts: int = 0
    top_k: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = False
    dense_layers: set[int] = field(default_factory=set)
    # Qwen3.5-MoE / Qwen3-Next: a gated shared expert of this width beside the routed ones
    shared_intermediate_size: int = 0
    linear: LinearAttentionConfig | None = None  # hybrids only
    weight_prefix: str = "model."  # "model.language_model." in multimodal checkpoints

    def is_moe_layer(self, layer: int) -> bool:
        return self.arch in MOE_FAMILIES and layer not in self.dense_layers

    @classmethod
    def load(cls, model_dir: str | Path) -> TargetConfig:
        outer = read_config(model_dir)
        archs = outer.get("architectures") or []
        architecture = next((a for a in archs if a in TARGET_ARCHITECTURES), None)
        if architecture is None:  # an export that names its class otherwise: model_type says
            architecture = MODEL_TYPES.get(outer.get("model_type"))
        cfg = _text_config(outer)
        if architecture is None or "DFlashDraftModel" in archs:
            raise ValueError(
                f"unsupported target architecture {archs or cfg.get('model_type')!r} in "
                f"{model_dir}; supported: {sorted(TARGET_ARCHITECTURES)}"
            )
        eos = cfg.get("eos_token_id")
        gen_path = Path(model_dir) / "generation_config.json"
        if gen_path.is_file():
            eos = json.loads(gen_path.read_text()).get("eos_token_id", eos)
        eos_ids = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
        arch = TARGET_ARCHITECTURES[architecture]
        if arch in HYBRID_FAMILIES:
            cfg = {**cfg, "layer_types": _hybrid_layer_types(cfg)}
        out = cls(
            architecture=architecture,
            arch=arch,
            decoder=DecoderConfig.from_dict(cfg),
            vocab_size=int(cfg["vocab_size"]),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            eos_token_ids=eos_ids,
        )
        if arch in HYBRID_FAMILIES:
            out.linear = LinearAttentionConfig.from_dict(cfg)
            if "text_config" in outer:
                out.weight_prefix = "model.language_model."
        if arch in MOE_FAMILIES:
            out.num_experts = int(cfg.get("num_experts") or cfg.get("num_local_experts") or 0)
            out.top_k = int(cfg["num_experts_per_tok"])
            out.moe_intermediate_size = int(cfg["moe_intermediate_size"])
            # Qwen3.5-MoE's router always renormalises its top-k; Qwen3-Next's by default
            out.norm_topk_prob = arch == "qwen3_5_moe" or bool(
                cfg.get("norm_topk_prob", arch == "qwen3_next"))
            out.shared_intermediate_size = int(cfg.get("shared_expert_intermediate_size") or 0)
            step = int(cfg.get("decoder_sparse_step", 1))
            only_mlp = set(cfg.get("mlp_only_layers") or [])
            out.dense_layers = {
                i
                for i in range(out.decoder.num_layers)
                if i in only_mlp or step <= 0 or (i + 1) % step != 0 or out.num_experts == 0
            }
        return out


def default_target_layer_ids(num_target_layers: int, num_ids: int) -> list[int]:
    """The z-lab rule when a drafter config names no layers: the middle layer for one id, else
    ids spread evenly from layer 1 to layer N-3."""
    if num_ids == 1:
        return [num_target_layers // 2]
    span = num_target_layers - 4
    return [round(1 + i * span / (num_ids - 1)) for i in range(num_ids)]


@dataclass(frozen=True, slots=True)
class AttentionKind:
    """Which keys a drafter layer's block queries see, as z-lab's `_attention_mask` decides: a
    query at position p sees the key at position k when (causal) k <= p, and (window W) p - k < W,
    and, for a non-causal window, also k - p < W. Context keys sit at their tokens' positions,
    block keys at the block's, so one rule covers both."""

    causal: bool = False
    window: int | None = None


FULL = AttentionKind()  # every cached context key and the whole block


@functools.cache
def _warn_window_off(use_sliding_window, window) -> None:
    """Once per process and setting (the config is read by every worker that loads it)."""
    log.warning("drafter: layer_types has sliding_attention layers but use_sliding_window is %r, "
                "so (as transformers' Qwen3Config does for z-lab's drafter) sliding_window %r "
                "is off: those layers are causal over every key", use_sliding_window, window)


def drafter_attention(cfg: dict, num_layers: int) -> tuple[AttentionKind, ...]:
    """Per layer, the attention of a drafter config, read the way z-lab's `DFlashDraftModel`
    reads its `Qwen3Config`:

    - `layer_types` entries are "full_attention" or "sliding_attention";
    - a layer is causal when it is sliding, unless `is_causal` (true or false) says otherwise for
      every layer;
    - a sliding layer's window is `sliding_window` when `use_sliding_window` is true;
      `Qwen3Config` drops the window otherwise (the layer then stays causal over all keys).
    """
    types = list(cfg.get("layer_types") or ["full_attention"] * num_layers)
    bad = {i: t for i, t in enumerate(types) if t not in ("full_attention", "sliding_attention")}
    if bad:
        raise ValueError(f"drafter layer_types {bad} (layer: type) are not supported; drafter "
                         "layers are 'full_attention' or 'sliding_attention'")
    sliding = "sliding_attention" in types
    window = cfg.get("sliding_window")
    if sliding and cfg.get("use_sliding_window"):
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise ValueError(f"drafter has sliding_attention layers and use_sliding_window true "
                             f"but sliding_window {window!r}; it must be an int >= 1 (the "
                             "number of positions a query sees, itself included)")
    else:
        if sliding:
            _warn_window_off(cfg.get("use_sliding_window"), window)
        window = None
    is_causal = cfg.get("is_causal")
    kinds = tuple(
        AttentionKind(
            causal=t == "sliding_attention" if is_causal is None else bool(is_causal),
            window=window if t == "sliding_attention" else None,
        )
        for t in types
    )
    dflash = cfg.get("dflash_config") or {}
    for key, value in (("causal", cfg.get("causal")), ("dflash_config.causal",
                                                       dflash.get("causal"))):
        # z-lab's reference reads only `is_causal`; vLLM also reads these: refuse a config
        # whose two readings would differ
        if value is not None and any(k.causal != bool(value) for k in kinds):
            raise ValueError(
                f"drafter {key} is {value!r}, but z-lab's reference ignores it and makes the "
                f"layers causal={[k.causal for k in kinds]} (from layer_types and is_causal "
                f"{is_causal!r}); set is_causal instead")
    return kinds


@dataclass(slots=True)
class DrafterConfig:
    decoder: DecoderConfig
    vocab_size: int
    block_size: int
    target_layer_ids: list[int]
    mask_token_id: int | None
    target_hidden_size: int
    # per layer: what its block queries see (empty: all FULL, z-lab's Qwen3 drafters)
    layer_attention: tuple[AttentionKind, ...] = ()

    def __post_init__(self) -> None:
        if not self.layer_attention:
            self.layer_attention = (FULL,) * self.decoder.num_layers
        if len(self.layer_attention) != self.decoder.num_layers:
            raise ValueError(f"drafter has {len(self.layer_attention)} layer attentions for "
                             f"num_hidden_layers {self.decoder.num_layers}")

    @classmethod
    def load(cls, model_dir: str | Path) -> DrafterConfig:
        cfg = read_config(model_dir)
        archs = cfg.get("architectures") or []
        if not DRAFTER_ARCHITECTURES & set(archs):
            hint = (
                " (DFlash 2 drafters are not supported yet)" if "DFlash2DraftModel" in archs else ""
            )
            raise ValueError(
                f"drafter {model_dir} has architectures {archs!r}; expected "
                f"{sorted(DRAFTER_ARCHITECTURES)}{hint}"
            )
        dflash = cfg.get("dflash_config") or {}
        decoder = DecoderConfig.from_dict(cfg)
        try:
            attention = drafter_attention(cfg, decoder.num_layers)
        except ValueError as exc:
            raise ValueError(f"{model_dir}: {exc}") from None
        ids = dflash.get("target_layer_ids", cfg.get("target_layer_ids"))
        if ids is None:
            num_target = dflash.get("num_target_layers", cfg.get("num_target_layers"))
            if num_target is None:
                raise ValueError(
                    f"drafter {model_dir}: config has neither dflash_config.target_layer_ids "
                    "nor num_target_layers"
                )
            ids = default_target_layer_ids(int(num_target), decoder.num_layers)
        mask = dflash.get("mask_token_id", cfg.get("mask_token_id"))
        block = dflash.get("block_size", cfg.get("block_size", 16))
        return cls(
            decoder=decoder,
            vocab_size=int(cfg["vocab_size"]),
            block_size=int(block),
            target_layer_ids=[int(i) for i in ids],
            mask_token_id=None if mask is None else int(mask),
            target_hidden_size=int(cfg.get("target_hidden_size") or decoder.hidden_size),
            layer_attention=attention,
        )

    def check_fits(self, target: TargetConfig) -> None:
        """Raise ValueError naming the field when this drafter cannot serve `target`."""
        t = target.decoder
        if self.target_hidden_size != t.hidden_size:
            raise ValueError(
                f"drafter target_hidden_size/hidden_size {self.target_hidden_size} != target "
                f"hidden_size {t.hidden_size}"
            )
        if self.decoder.hidden_size != t.hidden_size:
            raise ValueError(
                f"drafter hidden_size {self.decoder.hidden_size} != target hidden_size "
                f"{t.hidden_size} (the drafter borrows the target's embedding and LM head)"
            )
        if self.vocab_size != target.vocab_size:
            raise ValueError(
                f"drafter vocab_size {self.vocab_size} != target vocab_size {target.vocab_size}"
            )
        bad = [i for i in self.target_layer_ids if not 0 <= i < t.num_layers]
        if bad or not self.target_layer_ids:
            raise ValueError(
                f"drafter target_layer_ids {self.target_layer_ids} must be non-empty and within "
                f"0..{t.num_layers - 1} (the target has {t.num_layers} layers)"
            )
        if self.mask_token_id is None or not 0 <= self.mask_token_id < target.vocab_size:
            raise ValueError(
                f"drafter mask_token_id {self.mask_token_id} must be an id inside the target's "
                f"vocab_size {target.vocab_size} (dflash_config.mask_token_id)"
            )
        if self.block_size < 2:
            raise ValueError(f"drafter block_size {self.block_size} must be >= 2")
