"""The small frozen records that cross actor boundaries.

One record per hop of the online path:
``RolloutRequest -> Rollout -> ScoredGroup -> TrainSample/TrainBatch -> UpdateResult``.
They hold plain Python values (and PIL images), so they pickle through Ray cheaply and
can be built in tests without any actor. Shapes are written as ``[n]`` (per completion) or
``[T]`` (per completion token).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Mapping

FinishReason = Literal["stop", "length"]


@dataclass(frozen=True)
class SamplingParams:
    """How to sample; mirrors the vLLM/HF names."""

    n: int = 1  # completions per prompt (GRPO's num_generations)
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 disables top-k
    max_tokens: int = 64  # max_completion_length
    stop: tuple[str, ...] = ()  # extra stop strings; EOS / <|im_end|> always stop
    seed: int | None = None  # per-request seed; None draws from the engine's generator


@dataclass(frozen=True)
class TrainerState:
    """The training progress a reward function sees as ``trainer_state`` (TRL's TrainerState fields)."""

    global_step: int = 0  # optimizer steps done before the step this prompt feeds
    max_steps: int = 0  # steps of the whole run (0 outside training, e.g. evaluation)
    epoch: float = 0.0  # passes over the training prompts so far


@dataclass(frozen=True)
class RolloutRequest:
    """One prompt to sample ``sampling.n`` completions for."""

    uid: str  # stable id of the prompt (e.g. "e0/r17"); used for exactly-once accounting
    prompt: Any  # conversational: list of message dicts (TRL format); or plain text
    images: tuple[Any, ...] = ()  # PIL images, in placeholder order
    columns: Mapping[str, Any] = field(default_factory=dict)  # extra dataset columns, e.g. solution
    sampling: SamplingParams = SamplingParams()
    trainer_state: TrainerState | None = None  # handed to the reward functions; None outside training


@dataclass(frozen=True)
class Completion:
    """One sampled completion."""

    token_ids: tuple[int, ...]  # [T] generated ids, stop token included when finish_reason == "stop"
    logprobs: tuple[float, ...]  # [T] sampling-time logprob of each generated token
    text: str  # decoded token_ids without special tokens
    finish_reason: FinishReason


@dataclass(frozen=True)
class Rollout:
    """All ``n`` completions of one prompt; the group stays together end to end."""

    request: RolloutRequest
    completions: tuple[Completion, ...]  # [n]
    policy_version: int  # version of the weights that sampled every completion here
    worker: str = ""  # id of the rollout worker that produced it
    generate_s: float = 0.0  # wall time spent generating this group


@dataclass(frozen=True)
class ScoredGroup:
    """A rollout with its rewards."""

    rollout: Rollout
    rewards: tuple[float, ...]  # [n] weighted sum over functions; None entries counted as 0 weight
    per_function: Mapping[str, tuple[float | None, ...]]  # fn name -> [n]; None = no opinion
    timeouts: Mapping[str, int] = field(default_factory=dict)  # fn name -> calls that timed out
    errors: Mapping[str, int] = field(default_factory=dict)  # fn name -> calls that raised / died
    score_s: float = 0.0
    error_messages: Mapping[str, str] = field(default_factory=dict)  # fn name -> why its call failed (one line)
    logged_metrics: Mapping[str, tuple[float, ...]] = field(default_factory=dict)  # log_metric name -> values
    logged_extra: Mapping[str, tuple[Any, ...]] = field(default_factory=dict)  # log_extra column -> [n]


@dataclass(frozen=True)
class TrainSample:
    """One completion ready for a policy-gradient update."""

    uid: str  # prompt uid of its group
    prompt: Any  # as in RolloutRequest
    images: tuple[Any, ...]
    completion_ids: tuple[int, ...]  # [T]
    old_logprobs: tuple[float, ...]  # [T] behaviour (sampling-time) logprobs
    advantage: float
    policy_version: int
    truncated: bool = False  # finish_reason == "length"
    # [T] the learner's logprobs for the weights that start the update (decoupled PPO's proximal
    # policy); set by the driver when a batch gets several passes, else None (the first pass has them).
    proximal_logprobs: tuple[float, ...] | None = None


@dataclass(frozen=True)
class TrainBatch:
    """One optimizer step's worth of samples (the *global* batch; the learner group shards it)."""

    samples: tuple[TrainSample, ...]  # [B]
    policy_version: int  # learner version these samples will update (staleness = this - sample's)

    @property
    def num_tokens(self) -> int:
        """Global completion-token count, the normaliser of token-level losses (dapo)."""
        return sum(len(s.completion_ids) for s in self.samples)


@dataclass(frozen=True)
class UpdateResult:
    """What one learner step reports back."""

    step: int  # optimizer steps taken so far (= new policy version)
    metrics: Mapping[str, float]  # flat names, e.g. loss, kl, clip_ratio/high, grad_norm, lr
    skipped: bool = False  # the gradient was not finite and the step was skipped
