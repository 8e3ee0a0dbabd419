"""Advantage estimators for group sampling (GRPO / GSPO group baseline, RLOO leave-one-out).

Rewards come as one flat ``[N]`` tensor ordered in consecutive groups of ``num_generations``
completions of the same prompt (TRL's layout): ``[p0g0, p0g1, ..., p1g0, ...]``.
A NaN reward means "unscorable" (every reward function returned ``None``): it is left out of the
group statistics and its advantage is 0, as TRL does.
"""

from __future__ import annotations

from typing import Literal

import torch

ScaleRewards = Literal["group", "batch", "none"]


def _grouped(rewards: torch.Tensor, num_generations: int) -> torch.Tensor:
    """``[N] -> [N / G, G]`` with a clear error when the layout is wrong."""
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be [N], got shape {tuple(rewards.shape)}")
    if num_generations < 1 or rewards.numel() % num_generations != 0:
        raise ValueError(
            f"{rewards.numel()} rewards cannot be split into groups of num_generations={num_generations}"
        )
    return rewards.view(-1, num_generations)


def _nanstd(x: torch.Tensor, dim: int | None = None, keepdim: bool = False) -> torch.Tensor:
    """Unbiased (Bessel-corrected) std ignoring NaN; NaN where fewer than 2 values are present."""
    dims = tuple(range(x.dim())) if dim is None else (dim,)
    mean = torch.nanmean(x, dim=dims, keepdim=True)
    count = (~torch.isnan(x)).sum(dim=dims, keepdim=True).to(x.dtype)
    var = torch.nanmean((x - mean) ** 2, dim=dims, keepdim=True) * count / (count - 1)
    var = torch.where(count > 1, var, torch.full_like(var, float("nan")))
    std = var.sqrt()
    return std if keepdim else std.squeeze(dims)


def group_advantages(
    rewards: torch.Tensor,
    num_generations: int,
    scale_rewards: ScaleRewards = "group",
    eps: float = 1e-4,
) -> torch.Tensor:
    """GRPO advantages: reward minus its group's mean, optionally divided by a std.

    Args:
        rewards: ``[N]`` scalar reward per completion, consecutive groups of ``num_generations``.
        num_generations: group size G (completions per prompt).
        scale_rewards: ``"group"`` divides by the group's std + eps; ``"batch"`` by the std of all
            N rewards + eps (the baseline is still the group mean); ``"none"`` does not divide
            (Dr. GRPO). Stds are unbiased (``N - 1``), as ``torch.std`` and TRL.
        eps: added to the std, TRL's 1e-4.

    Returns:
        ``[N]`` advantages, detached, 0 for NaN (unscorable) rewards. Advantages need the whole
        group (and for ``"batch"`` the whole batch): compute them before splitting into micro-batches.
    """
    rewards = rewards.detach()
    grouped = _grouped(rewards, num_generations)
    mean = torch.nanmean(grouped, dim=1, keepdim=True)
    advantages = (grouped - mean).reshape(-1)
    if scale_rewards == "group":
        std = _nanstd(grouped, dim=1, keepdim=True) if num_generations > 1 else torch.zeros_like(mean)
        advantages = advantages / (std.expand_as(grouped).reshape(-1) + eps)
    elif scale_rewards == "batch":
        std = _nanstd(rewards) if rewards.numel() > 1 else torch.zeros((), dtype=rewards.dtype)
        advantages = advantages / (std + eps)
    elif scale_rewards != "none":
        raise ValueError(f"unknown scale_rewards {scale_rewards!r}; use 'group', 'batch' or 'none'")
    return torch.nan_to_num(advantages, nan=0.0)


def rloo_advantages(rewards: torch.Tensor, num_generations: int) -> torch.Tensor:
    """REINFORCE leave-one-out advantages: reward minus the mean of the *other* rewards in its group.

    Args:
        rewards: ``[N]`` scalar reward per completion, consecutive groups of ``num_generations``.
        num_generations: group size G; with G == 1 there is no baseline and advantages are 0.

    Returns:
        ``[N]`` advantages ``r_i - (sum_j r_j - r_i) / (G' - 1)`` with G' the scorable (non-NaN)
        rewards in the group; detached; 0 for NaN rewards and for groups with a single scorable one.
    """
    rewards = rewards.detach()
    grouped = _grouped(rewards, num_generations)
    if num_generations == 1:
        return torch.zeros_like(rewards)
    count = (~torch.isnan(grouped)).sum(dim=1, keepdim=True).to(rewards.dtype)
    total = torch.nansum(grouped, dim=1, keepdim=True)
    baseline = (total - grouped) / (count - 1)
    return torch.nan_to_num((grouped - baseline).reshape(-1), nan=0.0)
