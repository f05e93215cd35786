"""Offline batch API shaped like vLLM's `LLM`: build an engine, generate for many prompts."""

from __future__ import annotations

from tqdm import tqdm

from .config import EngineConfig
from .core.outputs import RequestOutput
from .core.sampling_params import SamplingParams
from .executors import make_engine


class LLM:
    """`LLM(target=..., drafter=... | None)`; any other `EngineConfig` field as a keyword."""

    def __init__(self, target: str, drafter: str | None = None, **kwargs):
        self.engine = make_engine(EngineConfig(target=target, drafter=drafter, **kwargs))

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def generate(
        self,
        prompts: str | list[str] | list[list[int]],
        params: SamplingParams | list[SamplingParams] | None = None,
        use_tqdm: bool | None = None,
    ) -> list[RequestOutput]:
        """Outputs in prompt order; each has token_ids, text, finish_reason, acceptance_lengths."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        params_list = (
            params if isinstance(params, list) else [params or SamplingParams()] * len(prompts)
        )
        if len(params_list) != len(prompts):
            raise ValueError(f"{len(params_list)} SamplingParams for {len(prompts)} prompts")
        engine = self.engine
        ids = [engine.add_request(p, sp) for p, sp in zip(prompts, params_list, strict=True)]
        show = use_tqdm if use_tqdm is not None else len(prompts) > 1
        with tqdm(total=len(ids), desc="generate", unit="req", disable=not show) as bar:
            return engine.run_until_finished(ids, on_finish=lambda _: bar.update(1))
