"""The learner: one data-parallel rank of DeepSpeed training of a VLM policy (a plain class, no Ray).

It loads the policy (``raylign.models.loading``), wraps it in a DeepSpeed engine (ZeRO 0-3, bf16
on GPU / fp32 on CPU), and offers four things to its callers: ``update`` (one optimizer step over
this rank's shard of a global batch), ``logprobs`` / ``sequence_logps`` (forward only),
``iter_weight_buckets`` (HF-named full weights for the rollout engines) and the state that
``raylign.learner.checkpoint`` saves and restores. ``LearnerGroup`` runs N of them in Ray actors.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch

from raylign.config import LearnerConfig, ModelConfig, TrainConfig
from raylign.learner import engine as ds
from raylign.learner.distributed import all_reduce_max, all_reduce_sum, ensure_process_group, resolve_backend
from raylign.learner.extensions import prepare_deepspeed
from raylign.learner.logprobs import TokenLogprobs
from raylign.learner.model import build_policy, build_reference
from raylign.learner.objectives import MicroBatch, Objective
from raylign.learner.schedule import lr_at
from raylign.learner.weights import iter_buckets
from raylign.models.loading import load_processor
from raylign.protocol import UpdateResult


def default_device() -> torch.device:
    """The accelerator this process sees (Ray gives each GPU actor its own device 0), else the CPU."""
    return (
        torch.device("cuda", torch.cuda.current_device())
        if torch.cuda.is_available()
        else torch.device("cpu")
    )


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto``: bf16 on a GPU, fp32 on a CPU."""
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return precision


def chunks(items: Sequence[Any], size: int) -> list[Sequence[Any]]:
    """``items`` in consecutive pieces of at most ``size`` (in order)."""
    return [items[i : i + size] for i in range(0, len(items), size)]


class Learner:
    """One DeepSpeed data-parallel rank training the policy.

    Args:
        model_cfg, train_cfg, learner_cfg: this learner's config sections.
        num_training_steps: length of the learning-rate schedule.
        rank, world_size: this process's data-parallel rank; ``init_method`` (``tcp://host:port``)
            is required when ``world_size > 1``; alone, the learner makes a 1-rank loopback group.
        reference: keep a frozen reference model (KL penalties, DPO without precomputed
            reference logprobs). With LoRA the reference is the policy with adapters disabled.
        seed: seeds torch before building the model, so LoRA adapters start identical on every rank.
    """

    def __init__(
        self,
        model_cfg: ModelConfig,
        train_cfg: TrainConfig,
        learner_cfg: LearnerConfig,
        num_training_steps: int,
        *,
        rank: int = 0,
        world_size: int = 1,
        init_method: str | None = None,
        reference: bool = False,
        seed: int = 0,
        device: torch.device | None = None,
    ):
        self.model_cfg, self.train_cfg, self.learner_cfg = model_cfg, train_cfg, learner_cfg
        self.num_training_steps = num_training_steps
        self.rank, self.world_size = rank, world_size
        self.device = device or default_device()
        self.precision = resolve_precision(learner_cfg.precision, self.device)
        self.dtype = torch.bfloat16 if self.precision == "bf16" else torch.float32
        if model_cfg.dtype not in ("auto", {"bf16": "bfloat16", "fp32": "float32"}[self.precision]):
            raise ValueError(
                f"model.dtype={model_cfg.dtype} does not match learner precision {self.precision}; "
                "set model.dtype=auto"
            )
        ensure_process_group(rank, world_size, resolve_backend(learner_cfg.backend, self.device), init_method)
        self.processor = load_processor(model_cfg.name_or_path)
        self.is_lora = model_cfg.lora.r > 0
        torch.manual_seed(seed)
        prepare_deepspeed(self.device.type)  # no JIT op build on CPU; no silent wait on a dead build's lock
        self.engine = self._build_engine()
        self.has_reference = reference
        self.reference = self._build_reference() if reference and not self.is_lora else None
        self.step = 0  # update() calls so far, skipped ones included (the schedule position)
        self.skipped_steps = 0
        self.objective: Objective | None = None
        self.pending_objective_state: dict[str, float] | None = None  # restored before an objective was set

    # ------------------------------------------------------------------ model access

    def _build_engine(self) -> Any:
        """The policy in a DeepSpeed engine whose checkpoint reader only loads weights."""
        import deepspeed

        policy = build_policy(self.model_cfg, self.dtype)
        module = ds.PolicyModule(policy, self.device, self.learner_cfg.logprob_chunk_size, self.dtype)
        config = ds.deepspeed_config(
            self.train_cfg, self.learner_cfg, self.precision, self.device.type, self.world_size
        )
        groups = ds.param_groups(module, self.train_cfg.weight_decay)
        if not groups:
            raise ValueError(
                "the policy has no trainable parameter; check model.freeze_vision_tower and model.lora"
            )
        optimizer = None
        if ds.uses_guarded_optimizer(self.learner_cfg, self.precision):
            optimizer = ds.GuardedAdamW(
                groups, self.train_cfg.max_grad_norm, **ds.adam_kwargs(self.train_cfg)
            )
        engine, *_ = deepspeed.initialize(
            model=module, model_parameters=None if optimizer else groups, optimizer=optimizer, config=config
        )
        ds.make_loads_weights_only(engine)
        return engine

    def _build_reference(self) -> Any:
        """Frozen reference: a ZeRO-3 inference engine when the policy is sharded, else a plain module."""
        import deepspeed

        reference = build_reference(self.model_cfg, self.dtype)
        module = ds.PolicyModule(reference, self.device, self.learner_cfg.logprob_chunk_size, self.dtype)
        if self.learner_cfg.zero_stage == 3:
            config = ds.reference_config(self.train_cfg, self.learner_cfg, self.precision, self.device.type)
            engine, *_ = deepspeed.initialize(model=module, config=config)
            engine.eval()  # DeepSpeed's eval() does not return the engine
            return engine
        return module.to(self.device).eval()

    @property
    def policy(self) -> torch.nn.Module:
        """The HF (or PEFT) model being trained, as DeepSpeed holds it (partitioned under ZeRO-3)."""
        return self.engine.module.policy

    def _forward(
        self, batch: Mapping[str, torch.Tensor], temperature: float = 1.0, with_entropy: bool = False
    ) -> TokenLogprobs:
        """Policy logprobs through the engine (gradients flow when enabled)."""
        return TokenLogprobs(*self.engine(batch, temperature=temperature, with_entropy=with_entropy))

    def _reference_forward(
        self, batch: Mapping[str, torch.Tensor], temperature: float = 1.0, with_entropy: bool = False
    ) -> TokenLogprobs:
        """Reference logprobs (no gradients): adapters disabled under LoRA, else the frozen copy."""
        if not self.has_reference:
            raise ValueError("this learner was built without a reference model; pass reference=True")
        with torch.no_grad(), self._eval_mode():
            if self.is_lora:
                with self.policy.disable_adapter():
                    return self._forward(batch, temperature, with_entropy)
            return TokenLogprobs(*self.reference(batch, temperature=temperature, with_entropy=with_entropy))

    @contextlib.contextmanager
    def _eval_mode(self) -> Iterator[None]:
        """Eval mode (no dropout) for the duration, restoring the previous mode after."""
        was_training = self.engine.module.training
        self.engine.module.eval()
        try:
            yield
        finally:
            self.engine.module.train(was_training)

    # ------------------------------------------------------------------ forward only

    def logprobs(
        self, batch: Mapping[str, torch.Tensor], temperature: float = 1.0, reference: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Target-token logprobs ``[B, T]`` and mask ``[B, T]`` of a collated batch, on the CPU (eval mode).

        A collective under ZeRO-3: every rank must call it with a batch.
        """
        if reference:
            out = self._reference_forward(batch, temperature)
        else:
            with torch.no_grad(), self._eval_mode():
                out = self._forward(batch, temperature)
        return out.logprobs.cpu(), out.mask.cpu()

    def item_logprobs(
        self, items: Sequence[Any], objective: Objective, temperature: float = 1.0, reference: bool = False
    ) -> list[torch.Tensor]:
        """Each collated row's target logprobs as a 1-D CPU tensor, ``objective.rows_per_item`` per item, item-major.

        For preference pairs that is ``[chosen_0, rejected_0, chosen_1, ...]``. A collective under ZeRO-3.
        """
        mbs, error = self._collate_all(items, objective)
        if error is None and any(mb.skipped for mb in mbs):
            error = ValueError(
                "rows were dropped by truncation='skip'; filter them out before computing logprobs"
            )
        self._agree(mbs, error)
        out: list[torch.Tensor] = []
        for mb in mbs:
            lp, mask = self.logprobs(mb.inputs, temperature, reference)
            rows = [lp[r][mask[r]] for r in range(lp.shape[0])]
            per = objective.rows_per_item
            n = len(rows) // per  # collated order is [side 0 of every item, side 1 of every item, ...]
            out.extend(rows[side * n + i] for i in range(n) for side in range(per))
        return out

    def sequence_logps(
        self, items: Sequence[Any], objective: Objective, reference: bool = False
    ) -> torch.Tensor:
        """``[len(items), objective.rows_per_item]`` summed target logprobs per item (e.g. chosen, rejected).

        Used to precompute DPO reference logprobs: before the first update the policy *is* the
        reference, so ``reference=False`` works without a reference model.
        """
        sums = [row.sum() for row in self.item_logprobs(items, objective, reference=reference)]
        if not sums:
            return torch.zeros(0, objective.rows_per_item)
        return torch.stack(sums).view(-1, objective.rows_per_item)

    # ------------------------------------------------------------------ training

    def set_objective(self, objective: Objective) -> None:
        """Use ``objective`` from now on (loading restored objective state into it once)."""
        if objective is self.objective:
            return
        self.objective = objective
        if self.pending_objective_state is not None:
            objective.load_state_dict(self.pending_objective_state)
            self.pending_objective_state = None

    def learning_rate(self, step: int | None = None) -> float:
        """The learning rate of update number ``step`` (default: the next one)."""
        t = self.train_cfg
        step = self.step if step is None else step
        return lr_at(
            step,
            t.learning_rate,
            self.num_training_steps,
            t.lr_scheduler_type,
            t.warmup_steps,
            t.warmup_ratio,
        )

    def _collate_all(
        self, items: Sequence[Any], objective: Objective
    ) -> tuple[list[MicroBatch], Exception | None]:
        """This rank's micro-batches, or the error that stopped their collation (raised after the next sync)."""
        size = self.train_cfg.per_device_train_batch_size
        try:
            return [objective.collate(self.processor, piece) for piece in chunks(items, size)], None
        except Exception as error:  # noqa: BLE001 - re-raised on every rank after the next all-reduce
            return [], error

    def _agree(self, mbs: list[MicroBatch], error: Exception | None) -> None:
        """Every rank raises when any rank failed to collate, instead of waiting in a collective."""
        status = all_reduce_sum(torch.tensor([float(len(mbs)), float(error is not None)], device=self.device))
        if error is not None:
            raise error
        if status[1] > 0:
            raise RuntimeError("another learner failed to collate its rows for this step; see its error")
        if status[0] != len(mbs) * self.world_size:
            raise RuntimeError(
                f"ranks have different numbers of micro-batches ({len(mbs)} here, {int(status[0])} in all); "
                "give every learner the same number of rows"
            )

    def _global_totals(self, mbs: list[MicroBatch], objective: Objective) -> dict[str, torch.Tensor]:
        """Normaliser counts summed over this rank's micro-batches and all ranks."""
        keys = sorted(objective.counts(mbs[0]))
        local = torch.zeros(len(keys), dtype=torch.float64)
        for mb in mbs:
            counts = objective.counts(mb)
            local += torch.stack([counts[k].double() for k in keys])
        total = all_reduce_sum(local.to(self.device))
        return {k: total[i].to(torch.float32) for i, k in enumerate(keys)}

    def update(self, items: Sequence[Any], objective: Objective) -> UpdateResult:
        """One optimizer step on this rank's ``items`` (rows or ``TrainSample`` records).

        ``items`` are split into micro-batches of ``per_device_train_batch_size``; each micro-batch's
        loss uses counts of the global batch, so the step equals one over the whole batch at once.
        A step whose gradient is not finite is skipped (``UpdateResult.skipped``) and counted.
        """
        if not items:
            raise ValueError("update() needs at least one row on every learner")
        self.set_objective(objective)
        start = time.perf_counter()
        self.engine.train()
        mbs, error = self._collate_all(items, objective)
        self._agree(mbs, error)
        totals = self._global_totals(mbs, objective)
        lr = self.learning_rate()
        for group in self.engine.optimizer.param_groups:
            group["lr"] = lr
        reference = self._reference_forward if self.has_reference else None
        acc = _MetricSums(self.device)
        for mb in mbs:
            loss, metrics = objective.loss(mb, self._forward, reference, totals)
            self.engine.backward(loss * self.world_size)
            acc.add(loss, metrics, objective.metric_weight(mb).to(self.device))
        before = self.engine.skipped_steps
        self.engine.step()
        skipped = self.engine.skipped_steps > before
        self.skipped_steps += int(skipped)
        self.step += 1
        metrics = acc.reduce()
        metrics.update({f"num_{k}": float(v) for k, v in totals.items()})
        metrics.update(self._step_metrics(lr, skipped, time.perf_counter() - start, mbs))
        objective.after_step(metrics, skipped)
        return UpdateResult(step=self.step, metrics=metrics, skipped=skipped)

    def _step_metrics(
        self, lr: float, skipped: bool, seconds: float, mbs: list[MicroBatch]
    ) -> dict[str, float]:
        norm = self.engine.get_global_grad_norm()
        tokens = sum(int(mb.inputs["attention_mask"].sum()) for mb in mbs)
        global_tokens = float(all_reduce_sum(torch.tensor(float(tokens), device=self.device)))
        return {
            "grad_norm": float(norm) if norm is not None else float("nan"),
            "learning_rate": lr,
            "skipped_steps": float(self.skipped_steps),
            "time/update": seconds,
            "throughput/tokens_per_s": global_tokens / max(seconds, 1e-9),
            "data/skipped_rows": float(sum(mb.skipped for mb in mbs)),
        }

    # ------------------------------------------------------------------ weights

    def iter_weight_buckets(
        self, bucket_mb: float, trainable_only: bool = False
    ) -> Iterator[list[tuple[str, torch.Tensor]]]:
        """HF-named full weights in buckets of about ``bucket_mb`` MiB (a bigger tensor goes alone).

        Names are those of a freshly loaded HF model's ``named_parameters()``; LoRA adapters are
        merged into their base weights. Under ZeRO-3 each bucket is gathered in turn, so this is a
        collective: every rank must iterate it to the end. ``trainable_only`` keeps the weights that
        training can change (adapter-merged layers under LoRA).
        """
        return iter_buckets(self.policy, bucket_mb, trainable_only, self.learner_cfg.zero_stage == 3)

    def close(self) -> None:
        """Free the engines (the process group stays, for the next learner in this process)."""
        for engine in (self.engine, self.reference):
            if engine is not None and hasattr(engine, "destroy"):  # DeepSpeed engines (not a plain reference)
                engine.destroy()
        self.engine = None
        self.reference = None


class _MetricSums:
    """Weighted sums of micro-batch metrics; ``loss`` is summed (its terms already carry global normalisers).

    Metrics named ``.../max`` or ``.../min`` (e.g. ``sampling/importance_sampling_ratio/max``) are
    extremes: reduced by max / min over micro-batches and ranks, not averaged.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.loss = torch.zeros((), dtype=torch.float64, device=device)
        self.sums: dict[str, torch.Tensor] = {}
        self.maxima: dict[str, torch.Tensor] = {}  # min metrics are kept negated, so one max-reduce serves both
        self.weight = torch.zeros((), dtype=torch.float64, device=device)

    def add(self, loss: torch.Tensor, metrics: Mapping[str, torch.Tensor], weight: torch.Tensor) -> None:
        self.loss += loss.detach().double()
        self.weight += weight.double()
        for key, value in metrics.items():
            if key == "loss" or key.startswith("num_"):
                continue
            value = value.detach().double().to(self.device)
            if key.endswith(("/max", "/min")):
                value = value if key.endswith("/max") else -value
                self.maxima[key] = torch.maximum(self.maxima[key], value) if key in self.maxima else value
                continue
            term = value * weight.double()
            self.sums[key] = self.sums[key] + term if key in self.sums else term

    def reduce(self) -> dict[str, float]:
        """Global values: ``loss`` summed over ranks, extremes max/min over ranks, others a weighted mean."""
        keys = sorted(self.sums)
        local = torch.stack([self.loss, self.weight, *[self.sums[k] for k in keys]])
        total = all_reduce_sum(local).cpu()
        weight = float(total[1])
        out = {"loss": float(total[0])}
        out.update({k: float(total[2 + i]) / max(weight, 1e-12) for i, k in enumerate(keys)})
        extremes = sorted(self.maxima)
        if extremes:
            top = all_reduce_max(torch.stack([self.maxima[k] for k in extremes])).cpu()
            out.update({k: float(v) if k.endswith("/max") else -float(v) for k, v in zip(extremes, top)})
        return out
