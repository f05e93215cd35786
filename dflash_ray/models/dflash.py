"""The DFlash drafter in z-lab's checkpoint format (`DFlashDraftModel`).

A Qwen3 decoder stack with no embedding and no LM head (it borrows the target's). Target features
of committed tokens, `C = hidden_norm(fc(cat_l h_l))`, are projected by every layer's k/v
projections straight into the drafter's paged cache once (`materialize_context`: never recomputed,
no layer norm, no MLP on context rows). A draft pass then runs the block `[bonus, MASK x (B-1)]`
through the stack with attention over [cached context, block]: non-causal in a full-attention
layer (z-lab's Qwen3 drafters), causal and windowed in a sliding-attention layer (its
Qwen3.5-MoE drafters); each layer reads the masks of its own kind (`layer_attention`).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..ops import OPS, AttentionGroup, RotaryTable
from ..parallel.communicator import LOCAL
from .cache_spec import CacheSpec
from .hf_config import AttentionKind, DrafterConfig
from .layers import MLP, Attention, DecoderLayer, Linear, RMSNorm
from .loader import load_weights


class DFlashDrafter(nn.Module):
    def __init__(self, cfg: DrafterConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.decoder
        k = len(cfg.target_layer_ids)
        self.fc = Linear(k * cfg.target_hidden_size, d.hidden_size, bias=False)
        self.hidden_norm = RMSNorm(d.hidden_size, d.rms_norm_eps)
        self.layers = nn.ModuleList(
            DecoderLayer(
                d,
                Attention(d, d.num_heads, d.num_kv_heads, LOCAL),
                MLP(d.hidden_size, d.intermediate_size, LOCAL),
            )
            for _ in range(d.num_layers)
        )
        self.norm = RMSNorm(d.hidden_size, d.rms_norm_eps)
        self.rope = RotaryTable(d.head_dim, d.rope_theta, d.rope_scaling)

    def prepack(self) -> None:
        """`models.layers.prepack` hook: the context path's k/v rows (its Linears pack
        themselves)."""
        for layer in self.layers:
            layer.self_attn.pack_kv_rows()

    def attention_kinds(self) -> list[AttentionKind]:
        """The distinct kinds of attention of its layers: the masks a draft pass needs."""
        return list(dict.fromkeys(self.cfg.layer_attention))

    def cache_specs(self) -> list[CacheSpec]:
        return [layer.self_attn.cache_spec() for layer in self.layers]

    def project_context(self, features: torch.Tensor) -> torch.Tensor:
        """features [T, K*Ht] -> fused context C [T, H] (the training forward's form)."""
        return self.hidden_norm(self.fc(features))

    def materialize_context(
        self,
        features: torch.Tensor,  # [Tc, K*Ht] target features of newly committed tokens
        positions: torch.Tensor,  # [Tc]
        slots: torch.Tensor,  # [Tc]
        cache,
    ) -> None:
        if features.shape[0] == 0:
            return
        cos, sin = self.rope(positions, features.dtype)
        fc = None if torch.is_grad_enabled() else self.fc.packed
        OPS.context_intake(
            features, fc or self.fc.weight, self.hidden_norm.weight, self.hidden_norm.eps,
            [layer.self_attn.intake_layer() for layer in self.layers],
            self.cfg.decoder.num_kv_heads, cos, sin,
            [cache.layer(i) for i in range(len(self.layers))], slots,
        )

    def forward(
        self,
        block_embeds: torch.Tensor,  # [Tq, H]
        positions: torch.Tensor,  # [Tq]
        cache,  # cache.layer(i): layer i's (k_cache, v_cache)
        write_slots: torch.Tensor,  # [Tq]
        # per kind of attention (`attention_kinds`): its masks over [context, block]
        groups: dict[AttentionKind, list[AttentionGroup]],
    ) -> torch.Tensor:
        """Returns the final-normed hidden states of the block rows, [Tq, H]."""
        x = block_embeds
        cos, sin = self.rope(positions, x.dtype)
        for i, (layer, kind) in enumerate(zip(self.layers, self.cfg.layer_attention, strict=True)):
            x = layer(x, cos, sin, cache.layer(i), write_slots, groups[kind])
        return self.norm(x)

    @classmethod
    def from_pretrained(
        cls,
        model_dir: str | Path,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
    ) -> DFlashDrafter:
        cfg = DrafterConfig.load(model_dir)
        with torch.device("meta"):
            model = cls(cfg)
        model = model.to_empty(device=device).to(dtype)

        def rename(key: str) -> str | None:
            key = key.removeprefix("model.")
            # Some exports carry the target's embedding / head; the drafter borrows the target's.
            if key.startswith(("embed_tokens.", "lm_head.")) or key == "d2t" or key == "t2d":
                return None
            return key

        load_weights(model, model_dir, rename)
        model.rope.to(device)
        return model.eval()
