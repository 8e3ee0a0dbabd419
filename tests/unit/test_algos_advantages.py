"""Advantages (and the rollout-side TIS ratio) against TRL 1.16 and hand-computed values.

TRL computes these inline in ``GRPOTrainer._generate_and_score_completions`` and
``RLOOTrainer._generate_and_score_completions``; both are driven on trainers made with
``object.__new__`` whose generation, reward and logprob calls are replaced by stubs returning
our tensors.
"""

from __future__ import annotations

import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from raylign.algos import PolicyLossConfig, group_advantages, policy_loss, rloo_advantages

grpo_module = pytest.importorskip("trl.trainer.grpo_trainer")
rloo_module = pytest.importorskip("trl.trainer.rloo_trainer")

F64 = torch.float64


def _stub_trainer(cls, rewards, num_generations, old_logps, mask):
    """A trainer whose generate/score/forward calls return the given tensors."""
    n = mask.shape[0]
    tr = object.__new__(cls)
    tr.model = SimpleNamespace(training=True, is_gradient_checkpointing=False)
    tr.accelerator = SimpleNamespace(
        device=torch.device("cpu"),
        process_index=0,
        num_processes=1,
        gather=lambda x: x,
        reduce=lambda x, reduction: x,
    )
    tr.args = SimpleNamespace(
        per_device_train_batch_size=n,
        per_device_eval_batch_size=n,
        steps_per_generation=1,
        gradient_accumulation_steps=1,
        gradient_checkpointing_kwargs=None,
    )
    tr.num_generations = tr.num_generations_eval = num_generations
    tr.beta, tr.ref_model, tr.pad_to_multiple_of, tr.num_iterations = 0.0, None, None, 1
    tr._tokenizer = SimpleNamespace(pad_token_id=0)
    tr.mask_truncated_completions = tr.log_multimodal = tr.normalize_advantages = False
    tr.environment_factories, tr.environments, tr.tools, tr.reward_clip_range = None, [], None, None
    tr.reward_weights, tr.reward_func_names, tr.reward_funcs = torch.ones(1, dtype=F64), ["r"], [None]
    tr.multi_objective_aggregation = "sum_then_normalize"
    tr._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
    tr._logs = {
        "prompt": [],
        "completion": [],
        "rewards": defaultdict(list),
        "advantages": [],
        "extra": defaultdict(list),
    }
    tr._pending_extra_logs, tr._pending_metrics = {}, {}
    tr._calculate_rewards = lambda *a, **k: rewards.unsqueeze(1)
    tr._get_per_token_logps_and_entropies = lambda *a, **k: (old_logps, None, None)
    completion_ids = [[1] * int(length) for length in mask.sum(1).tolist()]
    return tr, completion_ids


def trl_grpo_rollout(
    rewards, num_generations, scale_rewards="group", old_logps=None, mask=None, sampler=None, cap=None
):
    """TRL's GRPO rollout post-processing; returns its output dict (advantages, IS ratio, ...)."""
    n = rewards.shape[0]
    mask = torch.ones(n, 2, dtype=torch.long) if mask is None else mask
    old_logps = torch.zeros(mask.shape, dtype=F64) if old_logps is None else old_logps
    tr, cids = _stub_trainer(grpo_module.GRPOTrainer, rewards, num_generations, old_logps, mask)
    tr.scale_rewards = scale_rewards
    tr.use_vllm = tr.vllm_importance_sampling_correction = sampler is not None
    tr.vllm_importance_sampling_mode = "token_truncate"
    tr.vllm_importance_sampling_clip_min, tr.vllm_importance_sampling_clip_max = None, cap
    # vLLM reports a missing logprob as None, which TRL maps to NaN; feed lists the same way
    sl = (
        None
        if sampler is None
        else [[None if math.isnan(x) else x for x in r[: len(c)].tolist()] for r, c in zip(sampler, cids)]
    )
    tr._generate = lambda prompts: ([[5, 6]] * n, cids, None, ["c"] * n, sl, {}, None, None)
    return tr._generate_and_score_completions([{"prompt": "p"}] * n)


def trl_rloo_advantages(rewards, num_generations):
    n = rewards.shape[0]
    mask = torch.ones(n, 2, dtype=torch.long)
    tr, cids = _stub_trainer(
        rloo_module.RLOOTrainer, rewards, num_generations, torch.zeros(n, 2, dtype=F64), mask
    )
    tr._generate = lambda prompts: ([[5, 6]] * n, cids, ["c"] * n)
    return tr._generate_and_score_completions([{"prompt": "p"}] * n)["advantages"]


def _rewards(seed, n, with_nan):
    r = torch.randn(n, generator=torch.Generator().manual_seed(seed), dtype=F64)
    if with_nan:
        r[1] = float("nan")  # one unscorable completion
        r[-2:] = float("nan")  # a group (of 2) with nothing scorable when num_generations == 2
    return r


@pytest.mark.parametrize("with_nan", [False, True])
@pytest.mark.parametrize("num_generations", [1, 2, 4])
@pytest.mark.parametrize("scale_rewards", ["group", "batch", "none"])
def test_group_advantages_match_trl(scale_rewards, num_generations, with_nan):
    rewards = _rewards(num_generations, 8, with_nan)
    expected = trl_grpo_rollout(rewards, num_generations, scale_rewards)["advantages"]
    torch.testing.assert_close(
        group_advantages(rewards, num_generations, scale_rewards), expected, rtol=1e-6, atol=1e-12
    )


@pytest.mark.parametrize("with_nan", [False, True])
@pytest.mark.parametrize("num_generations", [1, 2, 4])
def test_rloo_advantages_match_trl(num_generations, with_nan):
    rewards = _rewards(10 + num_generations, 8, with_nan)
    expected = trl_rloo_advantages(rewards, num_generations)
    torch.testing.assert_close(rloo_advantages(rewards, num_generations), expected, rtol=1e-6, atol=1e-12)


def test_group_advantages_hand_computed():
    rewards = torch.tensor([1.0, 0.0, 1.0, 2.0, 2.0, 2.0], dtype=F64)
    std = math.sqrt(1 / 3)  # unbiased std of (1, 0, 1): sqrt(((1/3)^2 * 2 + (2/3)^2) / 2)
    expected = [1 / 3 / (std + 1e-4), -2 / 3 / (std + 1e-4), 1 / 3 / (std + 1e-4), 0.0, 0.0, 0.0]
    assert group_advantages(rewards, 3).tolist() == pytest.approx(expected, rel=1e-12)
    assert group_advantages(rewards, 3, "none").tolist() == pytest.approx(
        [1 / 3, -2 / 3, 1 / 3, 0, 0, 0], rel=1e-12
    )
    batch_std = torch.tensor([1.0, 0.0, 1.0, 2.0, 2.0, 2.0]).std().item()
    got = group_advantages(rewards, 3, "batch", eps=0.0)
    assert got.tolist() == pytest.approx([1 / 3 / batch_std, -2 / 3 / batch_std, 1 / 3 / batch_std, 0, 0, 0])


def test_rloo_advantages_hand_computed():
    rewards = torch.tensor([1.0, 0.0, 1.0, 3.0, float("nan"), 1.0], dtype=F64)
    # group 1 baselines: (0+1)/2, (1+1)/2, (1+0)/2; group 2 ignores the NaN: baselines 1 and 3
    assert rloo_advantages(rewards, 3).tolist() == pytest.approx([0.5, -1.0, 0.5, 2.0, 0.0, -2.0])


def test_advantages_are_detached_and_validate_layout():
    rewards = torch.tensor([1.0, 2.0, 3.0, 4.0], requires_grad=True)
    assert not group_advantages(rewards, 2).requires_grad
    assert not rloo_advantages(rewards, 2).requires_grad
    with pytest.raises(ValueError, match="num_generations=3"):
        group_advantages(rewards, 3)
    with pytest.raises(ValueError, match=r"\[N\]"):
        rloo_advantages(rewards.view(2, 2), 2)
    with pytest.raises(ValueError, match="scale_rewards"):
        group_advantages(rewards, 2, "std")


def test_tis_weights_match_trl_rollout():
    """The truncated IS weight policy_loss applies equals TRL's token_truncate ratio.

    With new == old logprobs (ratio 1, no clipping), A = 1 and dapo, each token's gradient is
    ``-w_t / N``, which reveals the weight ``w_t`` policy_loss used.
    """
    g = torch.Generator().manual_seed(3)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 0], [1, 0, 0, 0]])
    old = -torch.rand(4, 4, generator=g, dtype=F64)
    sampler = old + 0.5 * torch.randn(4, 4, generator=g, dtype=F64)
    sampler[0, 2] = float("nan")  # a token the sampler could not score
    trl_ratio = trl_grpo_rollout(torch.zeros(4, dtype=F64), 2, "group", old, mask, sampler, cap=1.3)[
        "importance_sampling_ratio"
    ]
    assert (trl_ratio[mask.bool()] == 1.3).any() and (
        trl_ratio[mask.bool()] < 1
    ).any()  # cap and < 1 both hit
    logps = old.clone().requires_grad_(True)
    cfg = PolicyLossConfig(loss_type="dapo", tis_cap=1.3)
    loss, metrics = policy_loss(logps, old, torch.ones(4, dtype=F64), mask, cfg, sampler_logprobs=sampler)
    loss.backward()
    weights = -logps.grad * mask.sum()
    torch.testing.assert_close(weights[mask.bool()], trl_ratio[mask.bool()], rtol=1e-6, atol=1e-12)
    assert metrics["tis/ratio_mean"].item() == pytest.approx(trl_ratio[mask.bool()].mean().item(), rel=1e-6)
