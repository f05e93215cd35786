"""The flash-linear-attention adapters (`dflash_kernels.gated_delta`) equal the gated delta rule's
references (`dflash_ray.ops.recurrent`), and the registry offers them only where they can run.

fla (`fla-core`) is in the `gpu` extra, not in CI's install: its tests skip cleanly without it.
Without CUDA they run on CPU tensors under Triton's interpreter (`TRITON_INTERPRET=1`, set by
conftest): fla's fused recurrent kernel runs there, alone and as a tiny Qwen3.5's recurrent rule;
its chunked kernel does not (Triton 3.6: its autotuner asks for a GPU driver, and with the
autotuning bypassed its state-passing kernel, `chunk_delta_h`, calls `.to()` on a loop counter
the interpreter holds as a Python int), so the prefill adapter's parity test needs CUDA.

Tolerances: both sides compute in fp32 (the adapters widen bf16 inputs as the reference does);
the kernel sums dk products in another order than torch, ~1e-7 relative, so 1e-5. With a bf16
state the adapter forms each output from the state before its rounding, the reference from the
rounded one: they differ by bf16 rounding of the state (<= 2^-9 relative per element,
summed over dk of them), so 2e-2 on O(1) values.
"""

from __future__ import annotations

import importlib.util
import logging
import os

import pytest
import torch

import dflash_kernels
from dflash_ray import ops
from dflash_ray.ops import recurrent

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cuda" if torch.cuda.is_available() and not INTERPRET else "cpu"


def _inputs(n: int, length: int, hv: int, dk: int, dv: int, dtype=torch.float32, seed=0):
    """q, k, v, g, beta, state as the model hands them: q, k normalised, q scaled."""
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=gen)

    q = recurrent.l2_normalize(rand(n, length, hv, dk)) * dk**-0.5
    k = recurrent.l2_normalize(rand(n, length, hv, dk))
    v = rand(n, length, hv, dv)
    g = -torch.rand(n, length, hv, generator=gen) * 2  # decays exp(g) in (e^-2, 1]
    beta = torch.rand(n, length, hv, generator=gen)
    state = rand(n, hv, dk, dv) * 0.5
    return [t.to(DEVICE, dtype) for t in (q, k, v, g, beta)] + [state.to(DEVICE)]


@pytest.fixture(scope="module")
def gated_delta():
    """The adapters module, where fla and a way to run Triton (GPU or interpreter) exist."""
    pytest.importorskip("fla", reason="fla-core is not installed (the `gpu` extra)")
    if not INTERPRET and not torch.cuda.is_available():
        pytest.skip("TRITON_INTERPRET is not 1 and there is no CUDA device")
    if INTERPRET:
        from dflash_kernels.interpret import patch_interpreter

        patch_interpreter()
    from dflash_kernels import gated_delta

    return gated_delta


def _close(got, want, tol):
    torch.testing.assert_close(got.float().cpu(), want.float().cpu(), atol=tol, rtol=tol)


# (N, L, hv, dk, dv): a decode step, verify blocks of 4 and 8 positions, head dims that are no
# power of two (the kernel masks its tiles), one sequence and several
SHAPES = [(1, 1, 2, 8, 8), (3, 4, 4, 8, 16), (2, 8, 2, 12, 6), (4, 3, 1, 16, 8)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_recurrent_adapter_matches_reference_every_state(gated_delta, shape, dtype):
    q, k, v, g, beta, s0 = _inputs(*shape, dtype=dtype, seed=sum(shape))
    out, states = gated_delta.gated_delta_rule_recurrent(q, k, v, g, beta, s0)
    want_out, want_states = recurrent.gated_delta_rule_recurrent(q, k, v, g, beta, s0)
    assert out.dtype == states.dtype == torch.float32
    assert out.shape == want_out.shape and states.shape == want_states.shape
    _close(out, want_out, 1e-5)
    _close(states, want_states, 1e-5)


def test_recurrent_adapter_bf16_state(gated_delta):
    """A bf16 state: every per-position state is rounded as the reference rounds it, and a block
    computes bit for bit what its single-token steps compute (what keeps speculation lossless)."""
    q, k, v, g, beta, s0 = _inputs(2, 5, 4, 8, 8, seed=3)
    s0 = s0.to(torch.bfloat16).float()
    out, states = gated_delta.gated_delta_rule_recurrent(q, k, v, g, beta, s0, torch.bfloat16)
    want_out, want_states = recurrent.gated_delta_rule_recurrent(q, k, v, g, beta, s0,
                                                                 torch.bfloat16)
    assert torch.equal(states, states.to(torch.bfloat16).float())
    _close(states, want_states, 2e-2)
    _close(out, want_out, 2e-2)
    s = s0
    for t in range(q.shape[1]):
        step = slice(t, t + 1)
        o, ss = gated_delta.gated_delta_rule_recurrent(
            q[:, step], k[:, step], v[:, step], g[:, step], beta[:, step], s, torch.bfloat16)
        assert torch.equal(o[:, 0], out[:, t]) and torch.equal(ss[:, 0], states[:, t])
        s = ss[:, 0]


@pytest.mark.skipif(DEVICE != "cuda", reason="fla's chunked kernel does not run under Triton's "
                    "interpreter (its autotuner needs a GPU driver; the kernel fails there)")
@pytest.mark.parametrize("length", [1, 37, 64, 200])
def test_chunked_adapter_matches_reference(gated_delta, length):
    q, k, v, g, beta, s0 = _inputs(2, length, 4, 16, 16, seed=length)
    out, final = gated_delta.gated_delta_rule_chunked(q, k, v, g, beta, s0)
    want_out, want_final = recurrent.gated_delta_rule_chunked(q, k, v, g, beta, s0)
    assert out.dtype == final.dtype == torch.float32
    # fla's chunked kernel multiplies fp32 with tf32 where the GPU has it: a looser bound (not
    # yet checked on a GPU)
    _close(out, want_out, 2e-3)
    _close(final, want_final, 2e-3)


@pytest.fixture(scope="module")
def hybrid(tmp_path_factory):
    from .conftest import save_qwen35

    return save_qwen35(tmp_path_factory.mktemp("fla_hybrid") / "target")


@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16])
def test_hybrid_verify_and_rollback_through_the_adapter(gated_delta, hybrid, state_dtype):
    """The adapter as the model's recurrent rule (verify and the commit's replay): after a
    6-token verify and a rollback to each kept length, every DeltaNet slot holds bit for bit the
    state the verify computed after the last kept token, and (fp32 state) the continuation's
    logits equal transformers' (test_qwen35's check, the op swapped)."""
    from transformers import AutoModelForCausalLM

    from .test_qwen35 import check_rollback

    ref = AutoModelForCausalLM.from_pretrained(hybrid, dtype=torch.float32).eval()
    calls = []

    def adapter(*args):
        calls.append(args[0].shape)
        return gated_delta.gated_delta_rule_recurrent(*args)

    with ops.override("gated_delta_rule_recurrent", adapter):
        check_rollback(hybrid, ref, state_dtype)
    # per kept length: 3 DeltaNet layers' verify of 6, replay where cut, continuation of 2
    assert {s[1] for s in calls} >= {6, 2, 1}, calls


def _clear():
    dflash_kernels._fla_unavailable.cache_clear()
    dflash_kernels._unavailable.cache_clear()


def test_registry_without_fla_keeps_the_reference_and_names_fla(monkeypatch, caplog):
    """A CUDA machine with triton but no fla: the availability check says fla-core is missing,
    `get` gives nothing and the registry logs the reference with that reason."""
    _clear()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(dflash_kernels.importlib.util, "find_spec",
                        lambda name: None if name == "fla" else find_spec(name) or object())
    try:
        for name in dflash_kernels.FLA_KERNELS:
            assert dflash_kernels.get(name) is None
            assert dflash_kernels.reason(name) == "fla-core is not installed"
        with caplog.at_level(logging.INFO, logger="dflash_ray.ops"):
            chosen = ops._choose("gated_delta_rule_recurrent")
        assert chosen is ops.DEFAULT["gated_delta_rule_recurrent"]
        assert ("op gated_delta_rule_recurrent: reference (fla-core is not installed)"
                in caplog.text)
        # the Triton kernels of our own do not depend on fla
        assert dflash_kernels.get("rms_norm") is not None
    finally:
        _clear()


def test_registry_names_everything_missing(monkeypatch):
    _clear()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(dflash_kernels.importlib.util, "find_spec", lambda name: None)
    try:
        assert dflash_kernels.reason("gated_delta_rule_chunked") == (
            "triton is not installed; fla-core is not installed; einops is not installed; "
            "no CUDA device")
    finally:
        _clear()


def test_registry_offers_fla_where_it_runs_and_cpu_tensors_take_the_reference(monkeypatch):
    """Everything present: the registry offers the adapter, whose CPU (and float64) calls run
    the reference without importing the adapter module or fla."""
    _clear()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(dflash_kernels.importlib.util, "find_spec", lambda name: object())
    try:
        op = dflash_kernels.get("gated_delta_rule_recurrent")
        prefill = dflash_kernels.get("gated_delta_rule_chunked")
        assert op is not None and prefill is not None
        assert "gated_delta" in op.__qualname__
    finally:
        _clear()

    def no_kernel(name):
        raise AssertionError(f"a CPU tensor loaded {name}")

    monkeypatch.setattr(dflash_kernels.importlib, "import_module", no_kernel)
    for dtype in (torch.float32, torch.float64):
        q, k, v, g, beta, s0 = (t.to(dtype) for t in _inputs(2, 3, 2, 8, 8))
        for got, want in zip(op(q.cpu(), k.cpu(), v.cpu(), g.cpu(), beta.cpu(), s0.cpu()),
                             recurrent.gated_delta_rule_recurrent(
                                 q.cpu(), k.cpu(), v.cpu(), g.cpu(), beta.cpu(), s0.cpu()),
                             strict=True):
            assert torch.equal(got, want)
