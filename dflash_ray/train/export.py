"""Writing a drafter in z-lab's `DFlashDraftModel` format (config.json + model.safetensors with
z-lab's tensor names: our packed q/k/v and gate/up projections are split back)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..models.dflash import DFlashDrafter
from ..models.hf_config import DrafterConfig
from ..models.loader import packing_table


def zlab_state_dict(drafter: DFlashDrafter, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    params = dict(drafter.named_parameters())
    out: dict[str, torch.Tensor] = {}
    packed_into: dict[str, list[tuple[str, int]]] = {}
    for name, (packed, first) in packing_table(drafter).items():
        if packed in params:
            packed_into.setdefault(packed, []).append((name, first))
    for name, p in params.items():
        if name in packed_into:
            parts = sorted(packed_into[name], key=lambda t: t[1])
            bounds = [first for _, first in parts] + [p.shape[0]]
            for (part, first), end in zip(parts, bounds[1:], strict=True):
                out[part] = p.detach()[first:end]
        else:
            out[name] = p.detach()
    return {k: v.to(dtype).contiguous().cpu() for k, v in out.items()}


def zlab_config(cfg: DrafterConfig, num_target_layers: int, dtype: torch.dtype) -> dict:
    d = cfg.decoder
    return {
        "architectures": ["DFlashDraftModel"],
        "model_type": "qwen3",
        "auto_map": {"AutoModel": "dflash.DFlashDraftModel"},
        "block_size": cfg.block_size,
        "num_target_layers": num_target_layers,
        "dflash_config": {"target_layer_ids": cfg.target_layer_ids,
                          "mask_token_id": cfg.mask_token_id},
        "hidden_size": d.hidden_size,
        "intermediate_size": d.intermediate_size,
        "num_hidden_layers": d.num_layers,
        "num_attention_heads": d.num_heads,
        "num_key_value_heads": d.num_kv_heads,
        "head_dim": d.head_dim,
        "rms_norm_eps": d.rms_norm_eps,
        "rope_theta": d.rope_theta,
        "rope_scaling": None,
        "max_position_embeddings": d.max_position,
        "attention_bias": d.attention_bias,
        "attention_dropout": 0.0,
        "hidden_act": "silu",
        "layer_types": ["full_attention"] * d.num_layers,
        "sliding_window": None,
        "use_sliding_window": False,
        "tie_word_embeddings": False,
        "vocab_size": cfg.vocab_size,
        "dtype": str(dtype).removeprefix("torch."),
    }


def save_zlab(drafter: DFlashDrafter, out_dir: str | Path, num_target_layers: int,
              dtype: torch.dtype = torch.bfloat16) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(zlab_state_dict(drafter, dtype), str(out / "model.safetensors"),
              metadata={"format": "pt"})
    config = zlab_config(drafter.cfg, num_target_layers, dtype)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out
