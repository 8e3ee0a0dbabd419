"""TRL 1.16's own GRPO code, driven on hand-made tensors: the reference the loss parity tests compare with.

TRL computes the behaviour (vLLM) importance weights inline in
``GRPOTrainer._generate_and_score_completions`` and the loss in ``GRPOTrainer._compute_loss``. Both
run here on trainers made with ``object.__new__`` whose generation, reward and logprob calls are
replaced by stubs returning our tensors, so every number comes from TRL's code, not a re-derivation.
Reading TRL's private trainer attributes is safe because TRL is pinned in requirements/cpu.lock.
"""

from __future__ import annotations

import math
from collections import defaultdict
from types import SimpleNamespace
from typing import Any

import torch

F64 = torch.float64


def stub_trainer(cls: type, rewards: torch.Tensor, num_generations: int, old_logps: torch.Tensor,
                 mask: torch.Tensor) -> tuple[Any, list[list[int]]]:
    """A trainer whose generate/score/forward calls return the given tensors, and its completion ids."""
    n = mask.shape[0]
    tr = object.__new__(cls)
    tr.model = SimpleNamespace(training=True, is_gradient_checkpointing=False)
    tr.accelerator = SimpleNamespace(
        device=torch.device("cpu"), process_index=0, num_processes=1, gather=lambda x: x,
        reduce=lambda x, reduction: x,
    )
    tr.args = SimpleNamespace(
        per_device_train_batch_size=n, per_device_eval_batch_size=n, steps_per_generation=1,
        gradient_accumulation_steps=1, gradient_checkpointing_kwargs=None,
    )
    tr.num_generations = tr.num_generations_eval = num_generations
    tr.beta, tr.ref_model, tr.pad_to_multiple_of, tr.num_iterations = 0.0, None, None, 1
    tr._tokenizer = SimpleNamespace(pad_token_id=0)
    tr.mask_truncated_completions = tr.log_multimodal = tr.normalize_advantages = False
    tr.environment_factories, tr.environments, tr.tools, tr.reward_clip_range = None, [], None, None
    tr.reward_weights, tr.reward_func_names, tr.reward_funcs = torch.ones(1, dtype=F64), ["r"], [None]
    tr.multi_objective_aggregation = "sum_then_normalize"
    tr._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
    tr._logs = {"prompt": [], "completion": [], "rewards": defaultdict(list), "advantages": [],
                "extra": defaultdict(list)}
    tr._pending_extra_logs, tr._pending_metrics = {}, {}
    tr._calculate_rewards = lambda *a, **k: rewards.unsqueeze(1)
    tr._get_per_token_logps_and_entropies = lambda *a, **k: (old_logps, None, None)
    completion_ids = [[1] * int(length) for length in mask.sum(1).tolist()]
    return tr, completion_ids


def trl_grpo_rollout(rewards, num_generations, scale_rewards="group", old_logps=None, mask=None, sampler=None,
                     mode="token_truncate", clip_min=None, clip_max=None):
    """TRL's GRPO rollout post-processing; returns ``(output dict, metrics)`` (advantages, IS ratio, ...).

    ``sampler`` (``[B, T]``, NaN = unscored) turns on TRL's vLLM importance-sampling correction in
    ``mode`` with bounds ``[clip_min, clip_max]``; TRL reads it as float32 lists, as vLLM returns them.
    """
    from trl.trainer.grpo_trainer import GRPOTrainer

    n = rewards.shape[0]
    mask = torch.ones(n, 2, dtype=torch.long) if mask is None else mask
    old_logps = torch.zeros(mask.shape, dtype=F64) if old_logps is None else old_logps
    tr, cids = stub_trainer(GRPOTrainer, rewards, num_generations, old_logps, mask)
    tr.scale_rewards = scale_rewards
    tr.use_vllm = tr.vllm_importance_sampling_correction = sampler is not None
    tr.vllm_importance_sampling_mode = mode
    tr.vllm_importance_sampling_clip_min, tr.vllm_importance_sampling_clip_max = clip_min, clip_max
    # vLLM reports a missing logprob as None, which TRL maps to NaN; feed lists the same way
    sl = None if sampler is None else [
        [None if math.isnan(x) else x for x in r[: len(c)].tolist()] for r, c in zip(sampler, cids)
    ]
    tr._generate = lambda prompts: ([[5, 6]] * n, cids, None, ["c"] * n, sl, {}, None, None)
    out = tr._generate_and_score_completions([{"prompt": "p"}] * n)
    return out, {k: v[0] for k, v in tr._metrics["train"].items()}


def trl_compute_loss(cfg, data: dict[str, torch.Tensor], logps_leaf: torch.Tensor, with_ref: bool):
    """TRL's ``GRPOTrainer._compute_loss`` with ``cfg``'s (a ``PolicyLossConfig``) settings, on ``data``.

    ``data`` holds ``[B, T]`` ``old`` (proximal), ``sampler``, ``ref``, ``entropy``, ``mask`` and
    ``[B]`` ``adv``. With the behaviour correction on, the importance ratio comes from TRL's rollout
    code (``trl_grpo_rollout``). Returns ``(loss, TRL's logged metrics, rollout metrics)``.
    """
    from trl.trainer.grpo_trainer import GRPOTrainer

    correction = cfg.vllm_importance_sampling_correction
    tr = object.__new__(GRPOTrainer)
    tr._get_per_token_logps_and_entropies = lambda *a, **k: (logps_leaf, data["entropy"], None)
    tr.model = SimpleNamespace(training=True)
    tr.accelerator = SimpleNamespace(num_processes=1, gather=lambda x: x, reduce=lambda x, reduction: x)
    tr.args = SimpleNamespace(
        delta=cfg.delta, use_bias_correction_kl=cfg.use_bias_correction_kl, steps_per_generation=1,
        sapo_temperature_pos=cfg.sapo_temperature_pos, sapo_temperature_neg=cfg.sapo_temperature_neg,
        vespo_k_pos=cfg.vespo_k_pos, vespo_lambda_pos=cfg.vespo_lambda_pos, vespo_k_neg=cfg.vespo_k_neg,
        vespo_lambda_neg=cfg.vespo_lambda_neg,
    )
    tr.top_entropy_quantile, tr.off_policy_mask_threshold = 1.0, cfg.off_policy_mask_threshold
    tr.importance_sampling_level, tr.loss_type, tr.beta = cfg.importance_sampling_level, cfg.loss_type, cfg.beta
    tr.epsilon_low, tr.epsilon_high = cfg.epsilon, cfg.clip_high
    tr.use_vllm = tr.vllm_importance_sampling_correction = correction
    tr.current_gradient_accumulation_steps, tr.max_completion_length = 1, cfg.max_completion_length
    tr._entropy_bonus_enabled = tr.aux_loss_enabled = False
    tr._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
    b, t = data["mask"].shape
    inputs = {
        "prompt_ids": torch.ones(b, 1, dtype=torch.long),
        "prompt_mask": torch.ones(b, 1, dtype=torch.long),
        "completion_ids": torch.ones(b, t, dtype=torch.long),
        "completion_mask": data["mask"],
        "advantages": data["adv"],
        "old_per_token_logps": data["old"],
        "num_items_in_batch": data["mask"].sum(),
    }
    if with_ref:
        inputs["ref_per_token_logps"] = data["ref"]
    rollout_metrics: dict[str, float] = {}
    if correction:
        out, rollout_metrics = trl_grpo_rollout(
            torch.zeros(b, dtype=F64), 1, "none", data["old"], data["mask"], data["sampler"],
            cfg.vllm_importance_sampling_mode, cfg.vllm_importance_sampling_clip_min,
            cfg.vllm_importance_sampling_clip_max,
        )
        inputs["importance_sampling_ratio"] = out["importance_sampling_ratio"]
        inputs["sampling_per_token_logps"] = out["sampling_per_token_logps"]
    loss = tr._compute_loss(None, inputs)
    return loss, {k: v[0] for k, v in tr._metrics["train"].items()}, rollout_metrics
