"""The learner: DeepSpeed data-parallel training of the policy, logprobs, reference model, checkpoints.

``LearnerGroup`` (Ray actors) lives in ``raylign.learner.group``; it is not imported here so that
this package stays usable without Ray. DeepSpeed is imported only when a ``Learner`` is built.
"""

from raylign.learner.checkpoint import restore, save, save_model
from raylign.learner.learner import Learner
from raylign.learner.logprobs import TokenLogprobs, target_logprobs
from raylign.learner.objectives import (
    OBJECTIVES,
    MicroBatch,
    Objective,
    PolicyObjective,
    PreferenceObjective,
    SFTObjective,
    make_objective,
    policy_loss_config,
)
from raylign.learner.schedule import lr_at, lr_multiplier, num_warmup_steps

__all__ = [
    "OBJECTIVES",
    "Learner",
    "MicroBatch",
    "Objective",
    "PolicyObjective",
    "PreferenceObjective",
    "SFTObjective",
    "TokenLogprobs",
    "lr_at",
    "lr_multiplier",
    "make_objective",
    "num_warmup_steps",
    "policy_loss_config",
    "restore",
    "save",
    "save_model",
    "target_logprobs",
]
