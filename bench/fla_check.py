"""gpu_check's `fla` section: the flash-linear-attention adapters (`dflash_kernels.gated_delta`)
against the gated delta rule's references on the device, and their times.

Shapes: Qwen3.5-35B-A3B's DeltaNet heads (32 value heads of dk = dv = 128, q and k repeated to
them as the model hands them), a verify of 8 sequences x 16 positions from a committed state
(the recurrent rule: every per-position state) and a prefill of one `--context` prompt (the
chunked rule: the final state); fp32 inputs and state, as the model runs them. Besides the
adapter and the reference, one fused recurrent call over the whole block (final state only) is
timed: what the adapter's one launch per position costs over it. Needs CUDA and fla; anywhere
else it reports why it skipped (fla's kernels are checked on CPU by tests/test_fla_ops.py).
`--small` runs tiny heads.
"""

from __future__ import annotations

import torch

QWEN35 = dict(hv=32, dk=128, dv=128)
SMALL = dict(hv=4, dk=32, dv=32)


def _inputs(n: int, length: int, hv: int, dk: int, dv: int, device: str):
    from dflash_ray.ops.recurrent import l2_normalize

    g = torch.Generator(device=device).manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, device=device, generator=g)

    q = l2_normalize(rand(n, length, hv, dk)) * dk**-0.5
    k = l2_normalize(rand(n, length, hv, dk))
    decay = -torch.rand(n, length, hv, device=device, generator=g) * 0.5
    beta = torch.rand(n, length, hv, device=device, generator=g)
    return q, k, rand(n, length, hv, dv), decay, beta, rand(n, hv, dk, dv) * 0.1


def run(args, median_ms) -> dict:
    import dflash_kernels
    from dflash_ray.ops import OPS, recurrent

    why = dflash_kernels.reason("gated_delta_rule_recurrent")
    if torch.device(args.device).type != "cuda" or why != "a kernel is available":
        return {"skipped": f"needs CUDA and fla-core ({why})"}
    from fla.ops.gated_delta_rule import fused_recurrent_gated_delta_rule

    from dflash_kernels import gated_delta

    dev = args.device
    heads = SMALL if args.small else QWEN35
    out: dict = {"registry": {n: getattr(OPS, n).__qualname__ for n in dflash_kernels.FLA_KERNELS}}
    missing = [n for n, q in out["registry"].items() if "gated_delta" not in q]
    errors: dict[str, float] = {}
    # fp32 state: float rounding of sums in another order (recurrent); the chunked kernel's
    # tf32 products where the GPU uses them (chunked)
    tol = {"verify": 1e-4, "prefill": 5e-3}
    with torch.inference_mode():
        verify = _inputs(8, 16, **heads, device=dev)
        got = gated_delta.gated_delta_rule_recurrent(*verify)
        want = recurrent.gated_delta_rule_recurrent(*verify)
        errors["verify_out"] = float((got[0] - want[0]).abs().max())
        errors["verify_states"] = float((got[1] - want[1]).abs().max())
        out["verify_adapter_ms"] = median_ms(
            lambda: gated_delta.gated_delta_rule_recurrent(*verify), dev, args.repeat)
        out["verify_reference_ms"] = median_ms(
            lambda: recurrent.gated_delta_rule_recurrent(*verify), dev, args.repeat)
        q, k, v, decay, beta, s0 = verify
        out["verify_one_fla_call_final_state_only_ms"] = median_ms(
            lambda: fused_recurrent_gated_delta_rule(
                q, k, v, g=decay, beta=beta, scale=1.0, initial_state=s0,
                output_final_state=True), dev, args.repeat)
        prefill = _inputs(1, args.context, **heads, device=dev)
        got = gated_delta.gated_delta_rule_chunked(*prefill)
        want = recurrent.gated_delta_rule_chunked(*prefill)
        errors["prefill_out"] = float((got[0] - want[0]).abs().max())
        errors["prefill_final_state"] = float((got[1] - want[1]).abs().max())
        out["prefill_adapter_ms"] = median_ms(
            lambda: gated_delta.gated_delta_rule_chunked(*prefill), dev, args.repeat)
        out["prefill_reference_ms"] = median_ms(
            lambda: recurrent.gated_delta_rule_chunked(*prefill), dev, args.repeat)
    worst = [key for key, err in errors.items() if err > tol[key.split("_")[0]]]
    out["max_abs_error"] = errors
    if missing or worst:
        out["FAILED"] = f"registry kept references for {missing}; outside tolerance: {worst}"
    return out
