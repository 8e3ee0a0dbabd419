"""Offline evaluation pieces: answers, prompts of rows, eval losses (hand values, and the learner's own loss)."""

from __future__ import annotations

import math

import pytest
import torch

from raylign.config import DPOConfig, LearnerConfig, ModelConfig, SFTConfig, TrainConfig
from raylign.data.synthetic import format_answer, generate_example
from raylign.driver.offline_eval import (
    gold_answer,
    is_exact_match,
    pair_sums,
    preference_eval_metrics,
    sft_eval_metrics,
    split_row,
    tagged_answer,
)
from raylign.learner.learner import Learner
from raylign.learner.objectives import REF_CHOSEN, REF_REJECTED, PreferenceObjective, SFTObjective

USER = {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour?"}]}


def test_tagged_answer_and_exact_match():
    assert tagged_answer("<think>x</think><answer> Red </answer>") == " Red "
    assert tagged_answer("<answer>a</answer> then <answer>b</answer>") == "b"
    assert tagged_answer("red") is None
    assert is_exact_match("<think>x</think><answer> Red </answer>", "red")
    assert not is_exact_match("red", "red")  # no tag, no answer
    assert not is_exact_match("<answer>blue</answer>", "red")


def test_split_row_and_gold_answer_for_each_row_form():
    reply = format_answer("it is red", "red")
    sft = {"messages": [USER, {"role": "assistant", "content": [{"type": "text", "text": reply}]}], "images": [1]}
    prompt, text = split_row(sft)
    assert prompt == [USER] and text == reply
    assert gold_answer(sft) == "red"
    assert gold_answer({**sft, "solution": "blue"}) == "blue"  # the solution column wins
    pc = {"prompt": "What colour?", "completion": reply, "images": [1]}
    prompt, text = split_row(pc)
    assert prompt[0]["content"][0] == {"type": "image"} and text == reply
    pref = {"prompt": [USER], "chosen": [{"role": "assistant", "content": reply}],
            "rejected": [{"role": "assistant", "content": "<answer>blue</answer>"}]}
    assert split_row(pref) == ([USER], reply) and gold_answer(pref) == "red"
    assert gold_answer({"prompt": "q", "completion": "no tag"}) is None


def test_sft_eval_loss_token_and_sequence_means():
    rows = [torch.tensor([-1.0, -3.0]), torch.tensor([-2.0, -2.0, -2.0, -2.0])]
    token = sft_eval_metrics(rows, "token_mean")
    assert token["eval/loss"] == pytest.approx(12 / 6) and token["eval/nll"] == pytest.approx(2.0)
    assert sft_eval_metrics(rows, "sequence_mean")["eval/loss"] == pytest.approx((2.0 + 2.0) / 2)
    rows = [torch.tensor([-1.0]), torch.tensor([-3.0, -3.0, -3.0])]
    assert sft_eval_metrics(rows, "sequence_mean")["eval/loss"] == pytest.approx((1 + 3) / 2)
    assert sft_eval_metrics(rows, "token_mean")["eval/loss"] == pytest.approx(10 / 4)


def test_preference_eval_metrics_by_hand():
    # two pairs, item-major rows: chosen_0, rejected_0, chosen_1, rejected_1
    rows = [torch.tensor([-1.0, -1.0]), torch.tensor([-3.0]), torch.tensor([-2.0]), torch.tensor([-1.0, -0.5])]
    ref = torch.tensor([[-2.5, -2.5], [-2.0, -2.0]], dtype=torch.float64)
    assert pair_sums(rows).tolist() == [[-2.0, -3.0], [-2.0, -1.5]]
    objective = PreferenceObjective(DPOConfig(beta=0.5))
    m = preference_eval_metrics(rows, ref, objective)
    deltas = [(-2.0 + 2.5) - (-3.0 + 2.5), (-2.0 + 2.0) - (-1.5 + 2.0)]  # 1.0, -0.5
    expected = sum(-math.log(1 / (1 + math.exp(-0.5 * d))) for d in deltas) / 2
    assert m["eval/loss"] == pytest.approx(expected)
    assert m["eval/rewards/accuracies"] == 0.5
    assert m["eval/rewards/margins"] == pytest.approx(0.5 * (1.0 - 0.5) / 2)
    mpo = PreferenceObjective(DPOConfig(loss_type=["sigmoid", "sft"], loss_weights=[1.0, 2.0]))
    sft_term = preference_eval_metrics(rows, ref, mpo)["eval/loss/sft"]
    assert sft_term == pytest.approx((1 + 1 + 2) / 3)  # token mean over all chosen tokens


def _rows(n: int) -> tuple[list[dict], list[dict]]:
    sft, pref = [], []
    for i in range(n):
        ex = generate_example("color", i)
        right, wrong = format_answer(ex.reasoning, ex.answer), format_answer("hmm", ex.wrong)
        user = {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": ex.question}]}
        sft.append({"messages": [user, {"role": "assistant", "content": right}], "images": [ex.image]})
        pref.append({"prompt": [user], "chosen": right, "rejected": wrong, "images": [ex.image]})
    return sft, pref


@pytest.mark.parametrize("aggregation", ["token_mean", "sequence_mean"])
def test_eval_losses_equal_the_training_loss_at_the_same_weights(tiny_qwen_dir, aggregation):
    """The update reports the loss of the weights before its step: the eval path must give the same number."""
    train = TrainConfig(learning_rate=1e-3, per_device_train_batch_size=2)
    learner = Learner(ModelConfig(name_or_path=str(tiny_qwen_dir)), train, LearnerConfig(zero_stage=2), 4)
    sft_rows, pref_rows = _rows(4)
    sft = SFTObjective(SFTConfig(aggregation=aggregation))
    expected = sft_eval_metrics(learner.item_logprobs(sft_rows, sft), aggregation)["eval/loss"]
    assert learner.update(sft_rows, sft).metrics["loss"] == pytest.approx(expected, rel=1e-5)

    mpo = PreferenceObjective(DPOConfig(loss_type=["sigmoid", "bco_pair", "sft"], loss_weights=[0.8, 0.2, 1.0]))
    ref = pair_sums(learner.item_logprobs(pref_rows, mpo))  # "precomputed": a reference a step behind
    with_ref = [{**row, REF_CHOSEN: float(r[0]), REF_REJECTED: float(r[1])} for row, r in zip(pref_rows, ref)]
    learner.update(sft_rows, sft)
    eval_metrics = preference_eval_metrics(learner.item_logprobs(pref_rows, mpo), ref, mpo)
    update = learner.update(with_ref, mpo).metrics
    for key in ("loss", "loss/sigmoid", "loss/bco_pair", "loss/sft", "rewards/margins", "rewards/accuracies"):
        assert update[key] == pytest.approx(eval_metrics[f"eval/{key}"], rel=1e-4, abs=1e-6), key
    learner.close()

