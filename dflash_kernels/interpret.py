"""Running the kernels under Triton's interpreter (`TRITON_INTERPRET=1`, CPU tensors), how their
numerics are checked without a GPU (`tests/test_kernels.py`, `bench/gpu_check.py` on CPU).

`patch_interpreter()` fixes two ways Triton 3.6's interpreter departs from compiled kernels
here; it touches the interpreter only (compiled kernels never run its code) and is idempotent.
"""

from __future__ import annotations


def patch_interpreter() -> None:
    """1. It holds each int argument as a 1-element array and reads a loop bound
    (`range(0, num_k, BLOCK_N)`) as `int(array)`, which NumPy >= 2.3 refuses for arrays that are
    not 0-d; `.item()` is what it means.
    2. It truncates fp32 -> bf16 in `.to()`, where compiled Triton (like torch) rounds to
    nearest even; the conversion here does that (its own rounding mode loses the carry when a
    mantissa of all ones rounds up)."""
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter

    builder = interpreter.InterpreterBuilder
    if getattr(builder, "dflash_patched", False):
        return
    try:
        int(np.array([1]))
    except TypeError:
        patch = interpreter._patch_lang_tensor

        def patched(tensor, scope):
            patch(tensor, scope)
            scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.item()))

        interpreter._patch_lang_tensor = patched
    truncate = builder.create_fp_trunc

    def fp_trunc(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            bits = np.ascontiguousarray(src.data, dtype=np.float32).view(np.uint32)
            bits = bits.astype(np.uint64)
            rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
            rounded[np.isnan(src.data)] = 0x7FC0
            return interpreter.TensorHandle(rounded, tl.bfloat16)
        return truncate(self, src, dst_type)

    builder.create_fp_trunc = fp_trunc
    builder.dflash_patched = True
