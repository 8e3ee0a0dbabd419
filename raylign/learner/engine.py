"""DeepSpeed plumbing: the engine config, the module DeepSpeed wraps, and a weights-only checkpoint reader.

The learner drives gradient accumulation itself (``managed_gradient_accumulation: false``): it runs
``backward`` once per micro-batch, however many there are this step, then ``step`` once. DeepSpeed
averages gradients over data-parallel ranks; the learner multiplies each micro-batch loss by the
world size so the update is the gradient of the *sum* of micro-batch losses, each normalised by
counts of the whole global batch.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from raylign.config import LearnerConfig, TrainConfig
from raylign.learner.logprobs import target_logprobs
from raylign.learner.model import backbone_and_head


class PolicyModule(nn.Module):
    """What DeepSpeed wraps: the HF (or PEFT) model, with a forward that returns target logprobs.

    Going through the engine's forward (rather than calling submodules of ``engine.module``) lets
    DeepSpeed run its forward/backward bookkeeping (ZeRO-3 prefetch, backward prologue).
    Parameter names are the wrapped model's prefixed with ``policy.``.
    """

    def __init__(self, policy: nn.Module, device: torch.device, chunk_size: int, dtype: torch.dtype):
        super().__init__()
        self.policy = policy
        self.device = device
        self.chunk_size = chunk_size
        self.dtype = dtype

    def forward(
        self, batch: Mapping[str, torch.Tensor], temperature: float = 1.0, with_entropy: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """``(logprobs [B, T], mask [B, T], entropy [B, T] or None)`` of the batch's target tokens."""
        backbone, head = backbone_and_head(self.policy)
        # Pixel values arrive in float32; the vision tower computes in the weights' dtype.
        batch = {k: v.to(self.dtype) if v.is_floating_point() else v for k, v in batch.items()}
        out = target_logprobs(backbone, head, batch, self.device, temperature, self.chunk_size, with_entropy)
        return out.logprobs, out.mask, out.entropy


class GuardedAdamW(torch.optim.AdamW):
    """AdamW that computes the gradient norm, clips, and skips a step whose gradient is not finite.

    Used without ZeRO in fp32, where DeepSpeed hands the step straight to the client optimizer
    (after averaging gradients over ranks, so every rank takes the same decision). DeepSpeed reads
    ``overflow`` (to count the skip) and ``_global_grad_norm`` after ``step``; with ZeRO, DeepSpeed's
    own optimizer wrapper does the same.
    """

    def __init__(self, params: Any, max_grad_norm: float, **kwargs: Any):
        super().__init__(params, **kwargs)
        self.max_grad_norm = max_grad_norm
        self.overflow = False
        self._global_grad_norm: torch.Tensor | None = None

    @torch.no_grad()
    def step(self, closure=None):
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        norm = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros(())
        self._global_grad_norm = norm
        self.overflow = not bool(torch.isfinite(norm))
        if self.overflow:
            self.zero_grad(set_to_none=True)
            return None
        if self.max_grad_norm > 0:
            params = [p for g in self.param_groups for p in g["params"] if p.grad is not None]
            torch.nn.utils.clip_grads_with_norm_(params, self.max_grad_norm, norm)
        return super().step(closure)


def adam_kwargs(train: TrainConfig) -> dict[str, Any]:
    """AdamW hyper-parameters from the train section (the learning rate is reset every step)."""
    return {
        "lr": train.learning_rate,
        "betas": (train.adam_beta1, train.adam_beta2),
        "eps": train.adam_epsilon,
        "weight_decay": train.weight_decay,
    }


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Trainable parameters in two groups, as transformers' Trainer: no decay on biases and norm weights."""
    decay, no_decay, seen = [], [], set()
    for module in model.modules():
        is_norm = "norm" in type(module).__name__.lower()
        for name, p in module.named_parameters(recurse=False):
            if p.requires_grad and id(p) not in seen:  # tied weights appear under two modules
                seen.add(id(p))
                (no_decay if is_norm or name == "bias" else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def uses_guarded_optimizer(learner: LearnerConfig, precision: str) -> bool:
    """Stage 0 in fp32 is the one case where DeepSpeed neither clips with a returned norm nor skips."""
    return learner.zero_stage == 0 and precision == "fp32"


def deepspeed_config(
    train: TrainConfig, learner: LearnerConfig, precision: str, device_type: str, world_size: int
) -> dict[str, Any]:
    """The DeepSpeed config of the policy engine.

    The optimizer is always torch's AdamW (``torch_adam``), fused on a GPU: DeepSpeed's own Adams
    (FusedAdam, DeepSpeedCPUAdam) are JIT-built C++/CUDA ops, and the GPU image has no compiler
    (see ``torch_adamw_params``). Offloading is moot on a CPU. bf16 keeps fp32 master weights and
    checks gradients for inf/NaN so bad steps are skipped.
    """
    zero: dict[str, Any] = {"stage": learner.zero_stage}
    on_gpu = device_type == "cuda"
    if learner.offload_optimizer and on_gpu:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if learner.offload_param and on_gpu:
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    if learner.zero_stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    guarded = uses_guarded_optimizer(learner, precision)
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": train.per_device_train_batch_size,
        "gradient_accumulation_steps": 1,
        "train_batch_size": train.per_device_train_batch_size * world_size,
        "managed_gradient_accumulation": False,
        "gradient_clipping": 0.0 if guarded else train.max_grad_norm,
        "zero_optimization": zero,
        "bf16": {"enabled": precision == "bf16", "check_grad_overflow": True},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**62,
        "wall_clock_breakdown": False,
    }
    if not guarded:
        kwargs = adam_kwargs(train)
        adamw = torch_adamw_params(on_gpu, learner.offload_optimizer)
        params = {**kwargs, "betas": list(kwargs["betas"]), **adamw}
        config["optimizer"] = {"type": "AdamW", "params": params}
    return config


def torch_adamw_params(on_gpu: bool, offload_optimizer: bool) -> dict[str, bool]:
    """Optimizer params that make DeepSpeed 0.19 build ``torch.optim.AdamW`` and no op of its own.

    DeepSpeed's ``get_optimizer_configuration`` returns torch's AdamW when ``torch_adam`` is set
    (before it looks at offloading) and passes the remaining params to its constructor, so
    ``fused`` reaches torch. Fused only where the optimizer state lives on the GPU; with ZeRO
    offload the step runs over CPU tensors with torch's default (foreach) implementation, slower
    than DeepSpeedCPUAdam but with nothing to compile.
    """
    return {"torch_adam": True, **({"fused": True} if on_gpu and not offload_optimizer else {})}


def reference_config(
    train: TrainConfig, learner: LearnerConfig, precision: str, device_type: str
) -> dict[str, Any]:
    """DeepSpeed config of a ZeRO-3 inference engine holding the frozen reference, sharded like the policy."""
    zero: dict[str, Any] = {"stage": 3}
    if learner.offload_param and device_type == "cuda":
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    return {
        "train_micro_batch_size_per_gpu": train.per_device_train_batch_size,
        "zero_optimization": zero,
        "bf16": {"enabled": precision == "bf16"},
        "steps_per_print": 2**62,
    }


# DeepSpeed's own plain-data classes that appear in its ZeRO optimizer checkpoints (found by loading
# stage 0-3 checkpoints with weights_only=True). Allowing exactly these keeps loading free of
# arbitrary unpickling.
def deepspeed_safe_globals() -> list[Any]:
    """The classes ``torch.load(weights_only=True)`` must accept to read DeepSpeed checkpoints."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def make_loads_weights_only(engine: Any) -> None:
    """Make ``engine.load_checkpoint`` read files with ``torch.load(weights_only=True)``.

    DeepSpeed 0.19's ``TorchCheckpointEngine.load`` calls ``torch.load(weights_only=False)``,
    which would run arbitrary pickled code from a checkpoint directory. Every checkpoint file it
    reads goes through ``engine.checkpoint_engine.load``, so that one method is replaced.
    """
    allowed = deepspeed_safe_globals()

    def load(path: str, map_location=None):
        with torch.serialization.safe_globals(allowed):
            return torch.load(path, map_location=map_location, weights_only=True)

    engine.checkpoint_engine.load = load
