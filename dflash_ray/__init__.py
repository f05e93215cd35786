"""DFlash block-diffusion speculative decoding, served on Ray Serve.

`import dflash_ray` loads torch but never ray, fastapi or triton: the engine runs in one process,
and Ray is a shell around it (`dflash_ray.cluster`, `dflash_ray.server`).
"""

from .config import EngineConfig
from .core.engine import Engine
from .core.outputs import RequestOutput
from .core.sampling_params import SamplingParams
from .demo import demo_pair
from .executors import make_engine
from .llm import LLM

__all__ = ["LLM", "Engine", "EngineConfig", "RequestOutput", "SamplingParams", "demo_pair",
           "make_engine"]
__version__ = "0.1.0"
