"""Reward functions (TRL's signature) and the worker that runs them under hard timeouts.

``RewardGroup`` (Ray actors) lives in ``raylign.rewards.group``; it is not imported here so that
this package stays usable without Ray.
"""

from raylign.rewards.builtin import (
    BUILTIN_FACTORIES,
    BUILTIN_REWARDS,
    accuracy_reward,
    format_reward,
    make_overlong_penalty,
)
from raylign.rewards.loader import RewardLoadError, load_reward_function, load_reward_functions
from raylign.rewards.worker import RewardWorker

__all__ = [
    "BUILTIN_FACTORIES",
    "BUILTIN_REWARDS",
    "RewardLoadError",
    "RewardWorker",
    "accuracy_reward",
    "format_reward",
    "load_reward_function",
    "load_reward_functions",
    "make_overlong_penalty",
]
