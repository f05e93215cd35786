"""Optional accelerated versions of the hot ops in `dflash_ray.ops`, installed as `dflash_kernels`.

`get(name)` returns a kernel with the reference op's signature, or None when there is none for
this machine; `dflash_ray.ops` asks once per op at import and logs its choice, with `reason(name)`
when it keeps the reference (`DFLASH_OPS=ref` skips the question).

Kernels (Triton): `paged_attention` (`attention.py`); `store_kv`, `rms_norm`, `apply_rope`
(`elementwise.py`); `context_intake`, each drafter layer's k-norm + RoPE + K/V store fused after
its projection (`intake.py`). They are offered only where they can run: a CUDA device is
present and Triton is installed. Even then a call whose tensors are not on a CUDA device (a CPU
model in the same process, a test) runs the reference, so the choice made at import is never
wrong for a tensor. Triton itself is imported at a kernel's first call, not here, so
`import dflash_ray` stays free of it. The Triton code also runs on CPU tensors under
`TRITON_INTERPRET=1` (how `tests/test_kernels.py` checks its numerics without a GPU): call
`attention` / `elementwise` / `intake` directly for that, after `interpret.patch_interpreter()`.

Gated DeltaNet (`FLA_KERNELS`): `gated_delta_rule_chunked` and `gated_delta_rule_recurrent`
adapt flash-linear-attention's Triton kernels (`gated_delta.py`; `fla-core` in the `gpu`
extra), offered only where a CUDA device is present and triton, fla-core and einops are all
importable (`reason` names each one missing); CPU tensors still run the reference. fla's fused
recurrent kernel is checked on CPU under the interpreter (`tests/test_fla_ops.py`); its chunked
kernel does not run there and is checked only on CUDA. Neither has run on a GPU yet.

MoE experts (`TORCH_KERNELS`): `moe_experts` as two grouped GEMMs of torch itself
(`moe.py`), routed on the device with no host sync, so a CUDA graph can hold an MoE layer.
Offered where a CUDA device of compute capability 9.0 or later is present (where torch's bf16
grouped GEMM runs without reading the group sizes back; older devices fall back to a loop that
does), for bf16 tensors; others run the reference. On CPU torch's own fallback runs it, which
is how `tests/test_kernels.py` checks it against the reference. Not yet run on a GPU.

There is no FlashInfer path yet: its paged attention plans each batch on the host from page
indices and lengths (then runs per layer), while an `AttentionGroup` carries resolved key slots
and a mask; the plan would be built once per forward from those (page size 1, or the block
table passed along) and cached across layers. It cannot be installed or tested without a GPU.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
from collections.abc import Callable

# op name -> module of this package that defines a kernel of that name
KERNELS = {
    "paged_attention": "attention",
    "store_kv": "elementwise",
    "rms_norm": "elementwise",
    "apply_rope": "elementwise",
    "context_intake": "intake",
}
# op name -> module of this package adapting flash-linear-attention's kernel for that op
FLA_KERNELS = {
    "gated_delta_rule_chunked": "gated_delta",
    "gated_delta_rule_recurrent": "gated_delta",
}
# op name -> module of this package running that op with torch's own CUDA kernels (no triton)
TORCH_KERNELS = {"moe_experts": "moe"}
# what the fla adapters need importable: module -> the distribution that installs it
FLA_REQUIRES = {"triton": "triton", "fla": "fla-core", "einops": "einops"}
# dtypes the kernels are written and tested for; others take the reference
DTYPES = ("float32", "bfloat16", "float16")
# ops whose kernel takes fewer dtypes than DTYPES
OP_DTYPES = {"moe_experts": ("bfloat16",)}
# the compute capability from which torch's bf16 grouped GEMM needs no host sync
GROUPED_MM_CAPABILITY = (9, 0)


@functools.cache
def _unavailable() -> str | None:
    """Why no kernel can run on this machine, or None when they can."""
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    import torch

    if not torch.cuda.is_available():
        return "no CUDA device"
    return None


@functools.cache
def _fla_unavailable() -> str | None:
    """Why the fla adapters cannot run on this machine (everything missing, named), or None."""
    why = [f"{dist} is not installed" for module, dist in FLA_REQUIRES.items()
           if importlib.util.find_spec(module) is None]
    import torch

    if not torch.cuda.is_available():
        why.append("no CUDA device")
    return "; ".join(why) or None


@functools.cache
def _torch_unavailable() -> str | None:
    """Why torch's grouped-GEMM MoE cannot run here without host syncs, or None when it can."""
    import torch

    if not torch.cuda.is_available():
        return "no CUDA device"
    found = torch.cuda.get_device_capability()
    if found < GROUPED_MM_CAPABILITY:
        return (f"compute capability {found[0]}.{found[1]}: torch's grouped GEMM reads its "
                f"group sizes back to the host below {GROUPED_MM_CAPABILITY[0]}.0")
    return None


def _module_of(name: str) -> str | None:
    return KERNELS.get(name) or FLA_KERNELS.get(name) or TORCH_KERNELS.get(name)


def _why_not(name: str) -> str | None:
    if name in FLA_KERNELS:
        return _fla_unavailable()
    return _torch_unavailable() if name in TORCH_KERNELS else _unavailable()


def reason(name: str) -> str:
    """Why `get(name)` gives no kernel (for the registry's log line)."""
    if _module_of(name) is None:
        return "no kernel written for this op"
    return _why_not(name) or "a kernel is available"


def _device_dispatch(name: str, reference: Callable) -> Callable:
    """The kernel `name` for CUDA tensors of a supported dtype, `reference` for any other."""
    where = _module_of(name)
    kernel: list[Callable] = []  # filled at the first CUDA call: triton is imported then
    dtypes = OP_DTYPES.get(name, DTYPES)

    @functools.wraps(reference)
    def op(first, *args, **kwargs):
        if not first.is_cuda or str(first.dtype).removeprefix("torch.") not in dtypes:
            return reference(first, *args, **kwargs)
        if not kernel:
            module = importlib.import_module(f"{__name__}.{where}")
            kernel.append(getattr(module, name))
        return kernel[0](first, *args, **kwargs)

    what = ("fla's triton kernel" if name in FLA_KERNELS
            else "torch's grouped GEMM" if name in TORCH_KERNELS else "triton")
    op.__qualname__ = f"dflash_kernels.{where}.{name} ({what} on CUDA tensors)"
    op.kernel_dtypes = dtypes  # where the kernel, not the reference, runs (CUDA tensors)
    return op


def get(name: str) -> Callable | None:
    if _module_of(name) is None or _why_not(name) is not None:
        return None
    from dflash_ray.ops import recurrent, reference

    return _device_dispatch(name, getattr(recurrent if name in FLA_KERNELS else reference, name))
