"""The target model: Qwen3 (dense) and Qwen3-MoE over a paged KV cache, from a Hugging Face dir.

Owns the forward over a flattened ragged batch (any number of sequences, prefill and decode
tokens together), capture of the hidden states the drafter needs (output of decoder layer l =
HF `hidden_states[l + 1]`), the embedding and LM head the drafter borrows. Sharding (TP heads,
EP experts; ranks beyond the TP size hold no attention) enters only through `ShardSpec` and a
`Communicator`; the math is the same.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..ops import AttentionGroup, RotaryTable
from ..parallel.communicator import LOCAL, Communicator
from .cache_spec import CacheSpec
from .hf_config import TargetConfig
from .layers import (
    MLP,
    Attention,
    DecoderLayer,
    Linear,
    NoAttention,
    RMSNorm,
    SparseMoE,
    embedding,
)
from .loader import load_weights
from .sharding import ShardSpec, full_shard


class Qwen3Target(nn.Module):
    def __init__(
        self, cfg: TargetConfig, shard: ShardSpec | None = None, comm: Communicator = LOCAL
    ):
        super().__init__()
        self.cfg = cfg
        self.shard = shard or full_shard(cfg)
        d, s = cfg.decoder, self.shard
        self.embed_tokens = embedding(cfg.vocab_size, d.hidden_size)
        layers = []
        for i, kind in enumerate(d.layer_types):
            if kind != "full_attention":
                raise ValueError(f"{cfg.architecture}: layer {i} is {kind!r}; only "
                                 "'full_attention' layers are supported")
            if s.has_attention:
                attn = Attention(
                    d, s.head_range[1] - s.head_range[0], s.kv_range[1] - s.kv_range[0], comm
                )
            else:
                attn = NoAttention(d, comm)
            if cfg.is_moe_layer(i):
                mlp = SparseMoE(
                    d.hidden_size,
                    cfg.moe_intermediate_size,
                    cfg.num_experts,
                    cfg.top_k,
                    cfg.norm_topk_prob,
                    s.expert_range,
                    comm,
                )
            else:
                mlp = MLP(d.hidden_size, s.mlp_range[1] - s.mlp_range[0], comm)
            layers.append(DecoderLayer(d, attn, mlp))
        self.layers = nn.ModuleList(layers)
        self.norm = RMSNorm(d.hidden_size, d.rms_norm_eps)
        self.lm_head = Linear(d.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.rope = RotaryTable(d.head_dim, d.rope_theta, d.rope_scaling)

    @property
    def num_kv_heads(self) -> int:
        return self.shard.kv_range[1] - self.shard.kv_range[0]

    def cache_specs(self) -> list[CacheSpec]:
        """Per layer, the cache it needs (`worker/caches.py` allocates them)."""
        return [layer.self_attn.cache_spec() for layer in self.layers]

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [T, H] (after the final norm) -> [T, V] in fp32."""
        return self.lm_head(hidden).float()

    def forward(
        self,
        input_ids: torch.Tensor,  # [T]
        positions: torch.Tensor,  # [T]
        cache,  # the model's caches: cache.layer(i) is layer i's (see worker/caches.py)
        write_slots: torch.Tensor,  # [T]
        groups: list[AttentionGroup],
        capture: list[int] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Returns (final-normed hidden [T, H], captured features [T, K*H] or None), where the
        features are the outputs of decoder layers `capture` concatenated in that order."""
        x = self.embed(input_ids)
        cos, sin = self.rope(positions, x.dtype)
        taps: dict[int, torch.Tensor] = {}
        wanted = set(capture or ())
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, cache.layer(i), write_slots, groups)
            if i in wanted:
                taps[i] = x
        x = self.norm(x)
        if len(self.layers) - 1 in wanted:
            # HF's hidden_states[N] is the final-normed output, and DFlash drafters were trained
            # on HF's tuple, so the last layer's tap is taken after the norm.
            taps[len(self.layers) - 1] = x
        features = torch.cat([taps[i] for i in capture], dim=-1) if capture else None
        return x, features

    @classmethod
    def from_pretrained(
        cls,
        model_dir: str | Path,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        shard: ShardSpec | None = None,
        comm: Communicator = LOCAL,
    ) -> Qwen3Target:
        cfg = TargetConfig.load(model_dir)
        with torch.device("meta"):
            model = cls(cfg, shard, comm)
        model = model.to_empty(device=device).to(dtype)
        if cfg.tie_word_embeddings:
            model.lm_head.weight = model.embed_tokens.weight
        load_weights(model, model_dir, model.checkpoint_name, model.checkpoint_slice,
                     expert_range=model.shard.expert_range)
        model.rope.to(device)
        return model.eval()

    def checkpoint_name(self, key: str) -> str | None:
        """A checkpoint key -> our parameter name, None for tensors this rank does not hold."""
        key = key.removeprefix(self.cfg.weight_prefix)
        if self.cfg.tie_word_embeddings and key == "lm_head.weight":
            return None
        if not self.shard.has_attention and ".self_attn." in key:
            return None  # a rank beyond tp_size: its attention is NoAttention
        # multi-token-prediction heads and a multimodal checkpoint's vision tower
        return None if key.startswith(("mtp.", "model.visual.")) else key

    def checkpoint_slice(self, name: str, lazy) -> torch.Tensor:
        """Only this rank's rows/columns of a tensor are read from disk."""
        s, hd = self.shard, self.cfg.decoder.head_dim
        if ".self_attn.q_proj." in name:
            return lazy.slice(0, s.head_range[0] * hd, s.head_range[1] * hd)
        if ".self_attn.k_proj." in name or ".self_attn.v_proj." in name:
            return lazy.slice(0, s.kv_range[0] * hd, s.kv_range[1] * hd)
        if ".self_attn.o_proj." in name:
            return lazy.slice(1, s.head_range[0] * hd, s.head_range[1] * hd)
        if ".gate_proj." in name or ".up_proj." in name:  # dense MLP or shared expert
            return lazy.slice(0, *s.mlp_range)
        if ".down_proj." in name and ".experts." not in name:
            return lazy.slice(1, *s.mlp_range)
        return lazy.read()
