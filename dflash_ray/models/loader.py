"""Reading safetensors checkpoints (single file or sharded with an index) into our modules.

Owns: finding tensor files, renaming checkpoint keys to our parameter names, stacking per-expert
MoE weights, and refusing checkpoints whose tensors are missing or of the wrong shape. A `select`
hook lets a sharding plan load only its own slice of each tensor.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

# (our parameter name, slice-aware loader) -> tensor. `None` selects the whole tensor.
Select = Callable[[str, "_Lazy"], torch.Tensor]


class _Lazy:
    """A tensor in a safetensors file, read whole or as a slice only when asked."""

    def __init__(self, handle, key: str):
        self._handle, self.key = handle, key

    @property
    def shape(self) -> list[int]:
        return list(self._handle.get_slice(self.key).get_shape())

    def read(self) -> torch.Tensor:
        return self._handle.get_tensor(self.key)

    def slice(self, dim: int, start: int, stop: int) -> torch.Tensor:
        s = self._handle.get_slice(self.key)
        index = [slice(None)] * len(self.shape)
        index[dim] = slice(start, stop)
        return s[tuple(index)]


def tensor_files(model_dir: str | Path) -> list[Path]:
    d = Path(model_dir)
    for index_name in ("model.safetensors.index.json", "pytorch_model.safetensors.index.json"):
        index = d / index_name
        if index.is_file():
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            return [d / n for n in names]
    files = sorted(d.glob("*.safetensors"))
    if not files:
        raise ValueError(f"no *.safetensors weights in {str(model_dir)!r}")
    return files


def iter_tensors(model_dir: str | Path) -> Iterator[tuple[str, _Lazy]]:
    for path in tensor_files(model_dir):
        with safe_open(str(path), framework="pt") as handle:
            for key in handle.keys():  # noqa: SIM118 - safe_open has no __iter__
                yield key, _Lazy(handle, key)


_EXPERT = re.compile(r"^(.*\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")


def packing_table(module: nn.Module) -> dict[str, tuple[str, int]]:
    """Checkpoint names of projections we keep packed -> (our packed parameter, first row).

    Modules that pack several checkpoint projections into one matrix (q/k/v, gate/up) say so
    with `packed_name` and `packed_rows()`."""
    table = {}
    for path, sub in module.named_modules():
        rows = getattr(sub, "packed_rows", None)
        if rows is None:
            continue
        for proj, first in rows().items():
            for kind in ("weight", "bias"):
                table[f"{path}.{proj}.{kind}"] = (f"{path}.{sub.packed_name}.{kind}", first)
    return table


def load_weights(
    module: nn.Module,
    model_dir: str | Path,
    rename: Callable[[str], str | list[str] | None],
    select: Callable[[str, _Lazy], torch.Tensor] | None = None,
    expert_range: tuple[int, int] | None = None,
) -> None:
    """Copy a checkpoint into `module`'s parameters.

    rename: checkpoint key -> our (unpacked) parameter name, or None to skip the tensor, or a
      list of names when one fused checkpoint tensor feeds several of our parameters.
    select: that name + lazy tensor -> the tensor (or slice) this module holds; default whole
      (for a fused tensor, the rows of that one parameter).
    expert_range: [lo, hi) of experts held here; per-expert keys are stacked into our fused
      `experts.gate_up_proj [E, 2I, H]` / `experts.down_proj [E, H, I]` parameters.
    Packed projections (see `packing_table`) are copied into their rows of the packed matrix.
    """
    params = dict(module.named_parameters())
    packing = packing_table(module)
    loaded_rows: dict[str, int] = {}
    pick = select or (lambda name, lazy: lazy.read())
    for key, lazy in iter_tensors(model_dir):
        m = _EXPERT.match(key)
        if m:
            prefix, expert, proj = m.group(1), int(m.group(2)), m.group(3)
            lo, hi = expert_range or (0, 1 << 30)
            if not lo <= expert < hi:
                continue
            base = rename(f"{prefix}.{'down_proj' if proj == 'down_proj' else 'gate_up_proj'}")
            if base is None:
                continue
            param = params[base]
            tensor = pick(base, lazy)
            if proj == "down_proj":
                dst = param.data[expert - lo]
            else:
                half = param.shape[1] // 2
                row = 0 if proj == "gate_proj" else half
                dst = param.data[expert - lo, row : row + half]
            _copy(dst, tensor, key)
            loaded_rows[base] = loaded_rows.get(base, 0) + 1
            continue
        names = rename(key)
        for name in [names] if isinstance(names, str) else names or ():
            if name in packing:
                packed, first = packing[name]
                tensor = pick(name, lazy)
                dst = params[packed].data[first : first + tensor.shape[0]]
                _copy(dst, tensor, key)
                loaded_rows[packed] = loaded_rows.get(packed, 0) + tensor.shape[0]
                continue
            if name not in params:
                raise ValueError(f"checkpoint tensor {key!r} maps to unknown parameter {name!r}")
            tensor = pick(name, lazy)
            is_experts = name.endswith(("experts.gate_up_proj", "experts.down_proj"))
            if is_experts and expert_range is not None:
                tensor = tensor[expert_range[0] : expert_range[1]]
            _copy(params[name].data, tensor, key)
            loaded_rows[name] = _rows_needed(name, params[name])
    missing = [n for n, p in params.items() if loaded_rows.get(n, 0) < _rows_needed(n, p)]
    if missing:
        raise ValueError(f"checkpoint {model_dir} lacks tensors for: {missing[:8]}")


def _rows_needed(name: str, param: torch.Tensor) -> int:
    """Per-expert keys count one per (expert, projection); everything else counts rows."""
    if name.endswith("experts.gate_up_proj"):
        return 2 * param.shape[0]
    if name.endswith("experts.down_proj"):
        return param.shape[0]
    return param.shape[0] if param.dim() else 1


def _copy(dst: torch.Tensor, src: torch.Tensor, key: str) -> None:
    if tuple(dst.shape) != tuple(src.shape):
        raise ValueError(
            f"checkpoint tensor {key!r} has shape {tuple(src.shape)}, expected {tuple(dst.shape)}"
        )
    dst.copy_(src.to(dst.dtype))
