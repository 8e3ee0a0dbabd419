"""Rollout engines (transformers, vLLM) and the workers that sample completions with them.

``RolloutWorker`` / ``RolloutGroup`` (Ray) live in ``raylign.rollout.worker`` / ``.group`` and
``VLLMEngine`` in ``raylign.rollout.vllm``; they are not imported here, so this package stays
usable without Ray or vLLM.
"""

from raylign.rollout.engine import EngineSpec, RolloutEngine, make_engine, sampled_token_logprobs
from raylign.rollout.hf import TransformersEngine

__all__ = ["EngineSpec", "RolloutEngine", "TransformersEngine", "make_engine", "sampled_token_logprobs"]
