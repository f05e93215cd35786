"""Optional accelerated versions of the hot ops in `dflash_ray.ops`, installed as `dflash_kernels`.

`get(name)` returns a kernel with the reference op's signature, or None when there is none for
this machine; `dflash_ray.ops` asks once per op at import and logs its choice (`DFLASH_OPS=ref`
skips the question). No kernel ships yet: every op runs its torch reference (which uses the
vendor's SDPA / GEMM kernels on GPU).
"""

from collections.abc import Callable


def get(name: str) -> Callable | None:
    return None
