"""The hot ops of the target and the drafter, each chosen once per process.

Model code calls every hot op as `OPS.<name>(...)`. Each name starts as its plain-torch
reference (`reference.py`), or the reference's arithmetic in fewer torch calls where `fast.py`
has one (`DEFAULT`); where the optional `dflash_kernels` package has a kernel with the same
signature for this machine, the kernel takes its place. `DFLASH_OPS=ref` forces the references
everywhere (no fast path, no kernel, and no packed CPU weight format, `cpu_packed`). The choice
is logged once per op; `override` swaps one op for a while (tests, profiling).

Letters in shape comments: T tokens in a flattened ragged batch, N sequences, Q padded query
length, K padded key length, H hidden, nh/nkv heads, hd head dim, E experts, k experts per token.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterator

from . import recurrent, reference
from .cpu_packed import PackedWeight, can_pack
from .fast import FAST
from .reference import AttentionGroup, IntakeLayer, RotaryTable

log = logging.getLogger(__name__)

REFERENCE: dict[str, Callable] = {
    "linear": reference.linear,
    "rms_norm": reference.rms_norm,
    "apply_rope": reference.apply_rope,
    "silu_and_mul": reference.silu_and_mul,
    "paged_attention": reference.paged_attention,
    "store_kv": reference.store_kv,
    "context_intake": reference.context_intake,
    "route_experts": reference.route_experts,
    "moe_experts": reference.moe_experts,
    # Gated DeltaNet (Qwen3.5 / Qwen3-Next linear attention)
    "causal_conv1d": recurrent.causal_conv1d,
    "gated_delta_rule_chunked": recurrent.gated_delta_rule_chunked,
    "gated_delta_rule_recurrent": recurrent.gated_delta_rule_recurrent,
    "gated_rms_norm": recurrent.gated_rms_norm,
}

# what an op runs where no kernel stands in: the reference, or its fast path (same arithmetic)
DEFAULT: dict[str, Callable] = {**REFERENCE, **FAST}


def forced_reference() -> bool:
    return os.environ.get("DFLASH_OPS", "auto") == "ref"


def _choose(name: str) -> Callable:
    if forced_reference():
        return REFERENCE[name]
    impl = DEFAULT[name]
    kind = "fast path" if name in FAST else "reference"
    try:
        import dflash_kernels
    except ImportError as exc:  # the kernels package is optional
        log.info("op %s: %s (dflash_kernels unavailable: %s)", name, kind, exc)
        return impl
    kernel = dflash_kernels.get(name)
    if kernel is None:
        log.info("op %s: %s (%s)", name, kind, dflash_kernels.reason(name))
        return impl
    log.info("op %s: using kernel %s", name, kernel.__qualname__)
    return kernel


class _Ops:
    """One attribute per op (see REFERENCE), read at every call, so `override` reaches every
    caller."""

    __slots__ = tuple(REFERENCE)

    def __init__(self):
        self.choose()

    def choose(self) -> None:
        """(Re)choose every op, e.g. after `DFLASH_OPS` changed in this process."""
        for name in REFERENCE:
            setattr(self, name, _choose(name))


OPS = _Ops()


@contextlib.contextmanager
def override(name: str, impl: Callable) -> Iterator[None]:
    """Run `impl` in place of op `name` inside the block."""
    if name not in REFERENCE:
        raise KeyError(f"no op {name!r}; ops: {sorted(REFERENCE)}")
    before = getattr(OPS, name)
    setattr(OPS, name, impl)
    try:
        yield
    finally:
        setattr(OPS, name, before)


__all__ = ["DEFAULT", "OPS", "REFERENCE", "AttentionGroup", "IntakeLayer", "PackedWeight",
           "RotaryTable", "can_pack", "forced_reference", "override"]
