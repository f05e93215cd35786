"""DFlash block-diffusion speculative decoding, served on Ray Serve.

`import dflash_ray` loads torch but never ray, fastapi or triton: the engine runs in one process,
and Ray is a shell around it (`dflash_ray.cluster`, `dflash_ray.server`).
"""

from .core.engine import Engine, RequestOutput
from .core.sampling_params import SamplingParams
from .demo import demo_pair
from .llm import LLM

__all__ = ["LLM", "Engine", "RequestOutput", "SamplingParams", "demo_pair"]
__version__ = "0.1.0"
