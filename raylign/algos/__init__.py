"""Pure-torch losses and advantage estimators (no Ray, DeepSpeed, vLLM or transformers).

Every loss is a function of tensors plus its own small config and returns ``(loss, metrics)``,
with ``metrics`` a ``dict[str, Tensor]`` of detached 0-d tensors.
"""

from raylign.algos.advantages import group_advantages, rloo_advantages
from raylign.algos.dpo import DPOLossConfig, dpo_loss
from raylign.algos.grpo import PolicyLossConfig, policy_loss
from raylign.algos.kl import kl_penalty
from raylign.algos.sft import sft_loss

__all__ = [
    "DPOLossConfig",
    "PolicyLossConfig",
    "dpo_loss",
    "group_advantages",
    "kl_penalty",
    "policy_loss",
    "rloo_advantages",
    "sft_loss",
]
