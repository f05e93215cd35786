"""The op registry: model code reaches every hot op through it, a kernel with the reference's
signature takes an op's place where one exists, and DFLASH_OPS=ref forces the references."""

from __future__ import annotations

import os
import subprocess
import sys
from collections import Counter
from contextlib import ExitStack

from dflash_ray import LLM, SamplingParams
from dflash_ray.ops import OPS, REFERENCE, override


def test_model_code_calls_every_hot_op_through_the_registry(tiny):
    """Swap every op for a counting wrapper: DFlash engines' steps (target prefill and verify,
    drafter context intake and block pass) on a Qwen3-MoE and a Qwen3.5 hybrid target must
    call each one."""
    llms = [LLM(t, tiny["drafter"], drafter_dtype="float32", spec_profile="whole_block")
            for t in (tiny["moe"], tiny["qwen35"])]
    calls: Counter = Counter()

    def counting(name, impl):
        def op(*args, **kwargs):
            calls[name] += 1
            return impl(*args, **kwargs)
        return op

    with ExitStack() as stack:
        for name in REFERENCE:
            stack.enter_context(override(name, counting(name, getattr(OPS, name))))
        for llm in llms:
            out = llm.generate([[1, 2, 3, 4]], SamplingParams(max_tokens=12), use_tqdm=False)
            assert len(out[0].token_ids) == 12
    assert set(calls) == set(REFERENCE), f"never called through the registry: " \
        f"{sorted(set(REFERENCE) - set(calls))}"


CHOICE = """
import sys, types
fake = types.ModuleType("dflash_kernels")
def rms_norm_kernel(x, weight, eps):
    raise AssertionError("not run here")
fake.get = lambda name: rms_norm_kernel if name == "rms_norm" else None
fake.reason = lambda name: "the fake offers rms_norm only"
sys.modules["dflash_kernels"] = fake
from dflash_ray.ops import DEFAULT, OPS, REFERENCE
print(OPS.rms_norm is rms_norm_kernel, OPS.rms_norm is REFERENCE["rms_norm"],
      all(getattr(OPS, n) is DEFAULT[n] for n in REFERENCE if n != "rms_norm"),
      all(getattr(OPS, n) is REFERENCE[n] for n in REFERENCE if n != "rms_norm"))
"""


def choice(env_ops: str | None) -> str:
    env = {k: v for k, v in os.environ.items() if k != "DFLASH_OPS"}
    if env_ops is not None:
        env["DFLASH_OPS"] = env_ops
    out = subprocess.run([sys.executable, "-c", CHOICE], capture_output=True, text=True,
                         env=env, check=True)
    return out.stdout.strip()


def test_a_kernel_replaces_its_op_and_dflash_ops_ref_forces_the_references():
    # the kernel for rms_norm, elsewhere the defaults (references or their fast paths)
    assert choice(None) == "True False True False"
    # the override wins over the kernel and the fast paths
    assert choice("ref") == "False True False True"
