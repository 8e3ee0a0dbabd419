"""Objectives: turn a micro-batch of rows (or samples) plus the learner's logprobs into ``(loss, metrics)``.

An objective collates its own items, says which counts normalise its loss, and computes the loss of
one micro-batch from the policy's (and the reference's) logprobs with a loss from ``raylign.algos``.
The learner sums those counts over the GLOBAL batch (all micro-batches, all ranks) and passes the
totals to ``loss``, so that the sum of the micro-batch losses is the loss of the whole batch however
it is split. Each objective is built from its own config section; ``make_objective`` maps a method
name to one, explicitly.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from raylign.algos.dpo import DPOLossConfig, dpo_loss
from raylign.algos.grpo import PolicyLossConfig, policy_loss
from raylign.algos.sft import sft_loss
from raylign.config import DPOConfig, GRPOConfig, RaylignConfig, SFTConfig
from raylign.data.collate import Truncation, collate_completions, collate_preference, collate_sft
from raylign.data.tokens import vision_token_ids
from raylign.learner.logprobs import TokenLogprobs
from raylign.protocol import TrainSample

Metrics = dict[str, torch.Tensor]
REF_CHOSEN, REF_REJECTED = "ref_chosen_logps", "ref_rejected_logps"  # precomputed columns (TRL's names)


class LogprobFn(Protocol):
    """The learner's forward: target-token logprobs of a collated batch (policy, or frozen reference)."""

    def __call__(
        self, batch: Mapping[str, torch.Tensor], temperature: float = 1.0, with_entropy: bool = False
    ) -> TokenLogprobs: ...


@dataclass
class MicroBatch:
    """One collated micro-batch: model inputs (with ``completion_mask``) and the objective's own tensors."""

    inputs: dict[str, torch.Tensor]
    extras: dict[str, torch.Tensor] = field(default_factory=dict)
    skipped: int = 0  # rows dropped by truncation="skip"


class Objective(Protocol):
    """What the learner needs from an objective."""

    rows_per_item: int  # collated rows per item (2 for a preference pair)

    def collate(self, processor: Any, items: Sequence[Any]) -> MicroBatch: ...

    def counts(self, mb: MicroBatch) -> dict[str, torch.Tensor]: ...

    def metric_weight(self, mb: MicroBatch) -> torch.Tensor: ...

    def loss(
        self,
        mb: MicroBatch,
        policy: LogprobFn,
        reference: LogprobFn | None,
        totals: Mapping[str, torch.Tensor],
    ) -> tuple[torch.Tensor, Metrics]: ...

    def after_step(self, metrics: Mapping[str, float], skipped: bool) -> None: ...

    def state_dict(self) -> dict[str, float]: ...

    def load_state_dict(self, state: Mapping[str, float]) -> None: ...

    @property
    def needs_reference(self) -> bool: ...


class _Stateless:
    """Defaults for objectives that keep no state between steps."""

    rows_per_item = 1

    def after_step(self, metrics: Mapping[str, float], skipped: bool) -> None:
        return None

    def state_dict(self) -> dict[str, float]:
        return {}

    def load_state_dict(self, state: Mapping[str, float]) -> None:
        return None


def _without_vision(processor: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Every real token except image tokens and position 0 (nothing predicts it): the all-token SFT mask."""
    ids = batch["input_ids"]
    mask = batch["attention_mask"].bool() & ~torch.isin(
        ids, torch.tensor(sorted(vision_token_ids(processor)))
    )
    mask[:, 0] = False
    return mask.long()


@dataclass
class SFTObjective(_Stateless):
    """Negative log-likelihood of the completion (or of every text token) of ``collate_sft`` rows."""

    cfg: SFTConfig
    max_length: int | None = None
    truncation: Truncation = "error"

    @property
    def needs_reference(self) -> bool:
        return False

    def collate(self, processor: Any, items: Sequence[Mapping[str, Any]]) -> MicroBatch:
        skipped: list[int] = []
        batch = collate_sft(processor, items, self.max_length, self.truncation, skipped)
        kept = [row for b, row in enumerate(items) if b not in skipped]
        # Rows trained on every text token: all without completion_only_loss; `messages` rows without
        # assistant_only_loss (TRL's SFT default for conversations).
        full = torch.tensor([not self.cfg.completion_only_loss or (row.get("messages") is not None
                             and not self.cfg.assistant_only_loss) for row in kept], dtype=torch.bool)
        if full.any():
            every = _without_vision(processor, batch)
            batch["completion_mask"] = torch.where(full[:, None], every, batch["completion_mask"])
        return MicroBatch(batch, skipped=len(skipped))

    def counts(self, mb: MicroBatch) -> dict[str, torch.Tensor]:
        mask = mb.inputs["completion_mask"]
        return {"tokens": mask.sum().float(), "sequences": torch.tensor(float(mask.shape[0]))}

    def metric_weight(self, mb: MicroBatch) -> torch.Tensor:
        return mb.inputs["completion_mask"].sum().float()

    def loss(self, mb, policy, reference, totals):
        out = policy(mb.inputs)
        return sft_loss(out.logprobs, out.mask, self.cfg.aggregation, totals["tokens"], totals["sequences"])


def _sequence_sums(out: TokenLogprobs) -> torch.Tensor:
    """``[R]`` summed target logprob of each collated row (logprobs are 0 off the mask)."""
    return out.logprobs.sum(-1)


@dataclass
class PreferenceObjective:
    """DPO / MPO on ``collate_preference`` pairs (chosen rows first, then rejected rows).

    Reference logprobs come from the rows (``ref_chosen_logps``/``ref_rejected_logps``, as
    precomputed with ``Learner.sequence_logps``) or from the learner's reference. ``dpo_loss`` returns
    the micro-batch *mean*; it is rescaled by ``pairs / total pairs`` (and the ``sft`` term by the
    chosen-token totals) so the step's loss is the mean over the global batch.

    ``bco_running_mean``: ``bco_pair`` subtracts a running mean of the implicit rewards (the BCO
    paper, and TRL before 1.0; TRL 1.16 subtracts nothing). It is the mean over all earlier steps,
    updated after each applied step from that whole step, so it does not depend on how a step is
    split; it is saved in checkpoints.
    """

    cfg: DPOConfig
    max_length: int | None = None
    max_prompt_length: int | None = None
    truncation: Truncation = "error"
    bco_running_mean: bool = True
    rows_per_item: int = 2
    bco_mean: float = field(default=0.0, compare=False)  # state, not config: equal objectives may differ here
    bco_count: float = field(default=0.0, compare=False)

    def __post_init__(self) -> None:
        self.loss_cfg = DPOLossConfig(
            beta=self.cfg.beta,
            loss_type=tuple(self.cfg.loss_type),
            loss_weights=None if self.cfg.loss_weights is None else tuple(self.cfg.loss_weights),
            label_smoothing=self.cfg.label_smoothing,
        )

    @property
    def needs_reference(self) -> bool:
        return not self.cfg.precompute_ref_log_probs

    def collate(self, processor: Any, items: Sequence[Mapping[str, Any]]) -> MicroBatch:
        skipped: list[int] = []
        batch = collate_preference(
            processor, items, self.max_length, self.max_prompt_length, self.truncation, skipped
        )
        kept = [row for i, row in enumerate(items) if i not in set(skipped)]
        extras = {}
        if kept and all(REF_CHOSEN in row and REF_REJECTED in row for row in kept):
            extras = {k: torch.tensor([float(row[k]) for row in kept]) for k in (REF_CHOSEN, REF_REJECTED)}
        return MicroBatch(batch, extras, skipped=len(skipped))

    def counts(self, mb: MicroBatch) -> dict[str, torch.Tensor]:
        pairs = mb.inputs["input_ids"].shape[0] // 2
        return {
            "pairs": torch.tensor(float(pairs)),
            "chosen_tokens": mb.inputs["completion_mask"][:pairs].sum().float(),
        }

    def metric_weight(self, mb: MicroBatch) -> torch.Tensor:
        return torch.tensor(float(mb.inputs["input_ids"].shape[0] // 2))

    def _reference_logps(
        self, mb: MicroBatch, reference: LogprobFn | None, pairs: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if REF_CHOSEN in mb.extras:
            return mb.extras[REF_CHOSEN], mb.extras[REF_REJECTED]
        if reference is None:
            raise ValueError(
                "preference rows carry no ref_chosen_logps/ref_rejected_logps and the learner has no reference "
                "model; build the learner with reference=True or precompute them with Learner.sequence_logps"
            )
        with torch.no_grad():
            sums = _sequence_sums(reference(mb.inputs))
        return sums[:pairs], sums[pairs:]

    def loss(self, mb, policy, reference, totals):
        pairs = mb.inputs["input_ids"].shape[0] // 2
        ref_chosen, ref_rejected = self._reference_logps(mb, reference, pairs)  # before the policy forward
        out = policy(mb.inputs)
        sums = _sequence_sums(out)
        lengths = out.mask.sum(-1).to(sums.dtype)
        scale = pairs / totals["pairs"]
        chosen_nll = None
        if "sft" in self.loss_cfg.loss_type:
            nll, _ = sft_loss(out.logprobs[:pairs], out.mask[:pairs], num_tokens=totals["chosen_tokens"])
            chosen_nll = nll / scale  # dpo_loss's mean is rescaled by `scale` below; this term must not be
        shift = None
        if self.bco_running_mean and "bco_pair" in self.loss_cfg.loss_type:
            shift = torch.tensor(self.bco_mean, dtype=sums.dtype, device=sums.device)
        loss, metrics = dpo_loss(
            sums[:pairs],
            sums[pairs:],
            ref_chosen.to(sums),
            ref_rejected.to(sums),
            self.loss_cfg,
            chosen_nll=chosen_nll,
            bco_reward_mean=shift,
            chosen_lengths=lengths[:pairs],
            rejected_lengths=lengths[pairs:],
        )
        return loss * scale, metrics

    def after_step(self, metrics: Mapping[str, float], skipped: bool) -> None:
        """Fold this step's mean implicit reward into the running mean (applied steps only)."""
        value = metrics.get("bco/reward_mean")
        if skipped or value is None or not torch.isfinite(torch.tensor(value)):
            return
        n = 2.0 * metrics["num_pairs"]
        self.bco_count += n
        self.bco_mean += (value - self.bco_mean) * n / self.bco_count

    def state_dict(self) -> dict[str, float]:
        return {"bco_mean": self.bco_mean, "bco_count": self.bco_count}

    def load_state_dict(self, state: Mapping[str, float]) -> None:
        self.bco_mean = float(state.get("bco_mean", 0.0))
        self.bco_count = float(state.get("bco_count", 0.0))


def _pad_rows(rows: Sequence[Sequence[float]], width: int) -> torch.Tensor:
    out = torch.zeros(len(rows), width)
    for b, row in enumerate(rows):
        out[b, : len(row)] = torch.tensor(list(row), dtype=torch.float32)
    return out


@dataclass
class PolicyObjective(_Stateless):
    """GRPO / GSPO policy loss on ``TrainSample`` records (collated with ``collate_completions``), decoupled PPO.

    The samples' ``old_logprobs`` are the behaviour policy's (the rollout engine's, at sampling
    time); ``proximal_logprobs``, when the driver recomputed them, are the learner's for the weights
    that started the step. The ratio is taken against the proximal policy (the learner's own detached
    logprobs when there are none: on a step's first pass the weights are the proximal ones) and
    ``policy_loss`` weights each token by ``pi_prox / pi_behaviour``. Logits are divided by
    ``temperature`` (the sampling temperature), for the policy and the reference alike.
    """

    cfg: PolicyLossConfig
    temperature: float = 1.0
    mask_truncated_completions: bool = False

    @property
    def needs_reference(self) -> bool:
        return self.cfg.beta > 0

    def collate(self, processor: Any, items: Sequence[TrainSample]) -> MicroBatch:
        batch = collate_completions(
            processor, [s.prompt for s in items], [s.images for s in items], [s.completion_ids for s in items]
        )
        width = max((len(s.completion_ids) for s in items), default=0)
        keep = [not (self.mask_truncated_completions and s.truncated) for s in items]
        extras = {
            "sampler_logprobs": _pad_rows([s.old_logprobs for s in items], width),
            "advantages": torch.tensor([float(s.advantage) for s in items]),
            "keep": torch.tensor(keep),
        }
        recomputed = [s.proximal_logprobs is not None for s in items]
        if any(recomputed) and not all(recomputed):
            raise ValueError("some samples carry proximal_logprobs and some do not; recompute them for the whole batch")
        if items and all(recomputed):
            extras["proximal_logprobs"] = _pad_rows([s.proximal_logprobs for s in items], width)
        return MicroBatch(batch, extras)

    def _mask(self, mb: MicroBatch, mask: torch.Tensor) -> torch.Tensor:
        return mask & mb.extras["keep"].to(mask.device).unsqueeze(-1)

    def counts(self, mb: MicroBatch) -> dict[str, torch.Tensor]:
        lengths = mb.inputs["completion_mask"].sum(-1)
        tokens = (lengths * mb.extras["keep"]).sum().float()
        return {"tokens": tokens, "sequences": torch.tensor(float(lengths.shape[0]))}

    def metric_weight(self, mb: MicroBatch) -> torch.Tensor:
        return self.counts(mb)["tokens"]

    def loss(self, mb, policy, reference, totals):
        ref = None
        if reference is not None and self.cfg.beta > 0:
            with torch.no_grad():
                ref = reference(mb.inputs, temperature=self.temperature).logprobs
        out = policy(mb.inputs, temperature=self.temperature, with_entropy=True)
        mask = self._mask(mb, out.mask)
        proximal = mb.extras.get("proximal_logprobs")
        old = out.logprobs.detach() if proximal is None else proximal.to(out.logprobs)
        return policy_loss(
            out.logprobs,
            old,
            mb.extras["advantages"].to(out.logprobs),
            mask,
            self.cfg,
            ref_logprobs=ref,
            sampler_logprobs=mb.extras["sampler_logprobs"].to(out.logprobs),
            num_tokens=totals["tokens"],
            num_sequences=totals["sequences"],
            entropy=out.entropy,
        )


def policy_loss_config(g: GRPOConfig) -> PolicyLossConfig:
    """The policy-loss settings of a GRPO/GSPO config section (every loss setting has its TRL name in both)."""
    return PolicyLossConfig(**{f.name: getattr(g, f.name) for f in dataclasses.fields(PolicyLossConfig)})


def _sft(cfg: RaylignConfig) -> Objective:
    return SFTObjective(cfg.sft, cfg.data.max_length, cfg.data.truncation)


def _preference(cfg: RaylignConfig) -> Objective:
    return PreferenceObjective(cfg.dpo, cfg.data.max_length, cfg.data.max_prompt_length, cfg.data.truncation)


def _policy(cfg: RaylignConfig) -> Objective:
    g = cfg.grpo
    return PolicyObjective(policy_loss_config(g), g.temperature, g.mask_truncated_completions)


OBJECTIVES: dict[str, Callable[[RaylignConfig], Objective]] = {
    "sft": _sft,
    "dpo": _preference,
    "mpo": _preference,
    "grpo": _policy,
    "gspo": _policy,
}


def make_objective(cfg: RaylignConfig) -> Objective:
    """The objective of ``cfg.method``."""
    if cfg.method not in OBJECTIVES:
        raise ValueError(f"no objective for method {cfg.method!r}; choose one of {', '.join(OBJECTIVES)}")
    return OBJECTIVES[cfg.method](cfg)
