"""One-GPU smoke test of raylign's GPU paths, one line per check (under 5 minutes on one GPU).

    python jobs/gpu_smoke.py                 # every check; exit 1 if any failed
    python jobs/gpu_smoke.py --only engine   # checks whose name contains "engine"
    python jobs/gpu_smoke.py --list

Checks, on a tiny Qwen2.5-VL (text hidden 256, head_dim 64) built offline:
  optimizer      a bf16 Learner builds on the GPU (DeepSpeed with torch's AdamW, no JIT op build)
  engine         VLLMEngine with the GRPO recipe's engine kwargs (raylign.driver.online.engine_kwargs)
  generate       one image, n=2: two completions, per-token logprobs
  load_tensor    one perturbed tensor loaded -> fingerprint changes
  vision_cache   vision tower perturbed -> the same image gets new features (encoder cache reset)
  sleep_wake     sleep -> wake -> load every weight -> generate (level 1, then level 2)
  zero2, zero3   one bf16 update each, then a full sync into the engine; generations change
  nccl           learner -> engine over NCCL between two processes on two GPUs ("skipped" with one)
A check that cannot run (no GPU, no vLLM) prints "skipped" and why; the rest still run.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CHECKS = ("optimizer", "engine", "generate", "load_tensor", "vision_cache", "sleep_wake", "zero2", "zero3", "nccl")


class Skip(Exception):
    """The check cannot run here (the reason is printed)."""


@dataclass
class Report:
    """One line per check: ``name  ok|FAIL|skipped  seconds  detail``."""

    rows: list[tuple[str, str, float, str]] = field(default_factory=list)

    def run(self, name: str, fn: Callable[[], str]) -> None:
        start = time.perf_counter()
        try:
            status, detail = "ok", fn() or ""
        except Skip as why:
            status, detail = "skipped", str(why)
        except Exception as err:  # noqa: BLE001 - every check reports; the exit code says something failed
            status, detail = "FAIL", f"{type(err).__name__}: {err}".splitlines()[0][:300]
            traceback.print_exc(file=sys.stderr)
        self.rows.append((name, status, time.perf_counter() - start, detail))
        print(format_row(self.rows[-1]), flush=True)

    @property
    def failed(self) -> bool:
        return any(status == "FAIL" for _, status, _, _ in self.rows)


def format_row(row: tuple[str, str, float, str]) -> str:
    name, status, seconds, detail = row
    return f"{name:<13} {status:<8} {seconds:6.1f}s  {detail}"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default="", help="run the checks whose name contains this")
    parser.add_argument("--list", action="store_true", help="print the check names and exit")
    parser.add_argument("--hidden", type=int, default=256, help="tiny model text hidden size (head_dim = hidden/4)")
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.3)
    parser.add_argument("--nccl-role", choices=("sender", "engine"), help=argparse.SUPPRESS)
    parser.add_argument("--nccl-port", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--model", default="", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    unknown = [o for o in args.only.split(",") if o and not any(o in c for c in CHECKS)]
    if unknown:
        parser.error(f"--only {','.join(unknown)} matches no check; checks: {', '.join(CHECKS)}")
    return args


def selected(only: str) -> list[str]:
    wanted = [o for o in only.split(",") if o]
    return [c for c in CHECKS if not wanted or any(o in c for o in wanted)]


# ---------------------------------------------------------------------------------- the checks


class Smoke:
    """The state the checks share (model directory, engine, HF copy); each method is one check."""

    def __init__(self, args: argparse.Namespace, workdir: Path):
        import torch

        if not torch.cuda.is_available():
            raise Skip("no CUDA GPU")
        from raylign.models.tiny import make_tiny_model

        self.args, self.torch = args, torch
        self.model_dir = make_tiny_model("qwen2_5_vl", workdir / "tiny", hidden=args.hidden)
        self.engine = None
        self.hf = None

    def _requests(self, n: int, temperature: float, seed: int | None = None):
        from PIL import Image

        from raylign.protocol import RolloutRequest, SamplingParams

        s = SamplingParams(n=n, temperature=temperature, max_tokens=12, seed=seed)
        image = Image.new("RGB", (56, 56), (200, 30, 30))
        return [RolloutRequest(uid="img", prompt="how many red circles?", images=(image,), sampling=s)]

    def _needs_engine(self):
        if self.engine is None:
            raise Skip("the engine check did not build an engine")
        return self.engine

    def optimizer(self) -> str:
        learner = self._learner(zero_stage=2)
        opt = type(learner.engine.optimizer).__name__
        learner.close()
        return f"DeepSpeed optimizer {opt}, precision {learner.precision}"

    def engine_build(self, sleep: bool = False):
        from raylign.config import load_config
        from raylign.driver.online import engine_kwargs
        from raylign.rollout.vllm import VLLMEngine

        try:
            import vllm  # noqa: F401
        except ImportError as err:
            raise Skip(f"vLLM is not installed ({err})") from err
        cfg = load_config(
            REPO / "jobs" / "grpo_qwen2_5_vl_3b.yaml",
            [f"--model.name_or_path={self.model_dir}", f"--rollout.gpu_memory_utilization={self.args.gpu_memory_utilization}",
             f"--rollout.enable_sleep_mode={str(sleep).lower()}"],
            method="grpo",
        )  # fmt: skip
        kwargs = engine_kwargs(cfg, "cuda")
        return VLLMEngine(str(self.model_dir), **kwargs), kwargs

    def check_engine(self) -> str:
        self.engine, kwargs = self.engine_build()
        return f"kwargs {sorted(kwargs)}; max_model_len {kwargs['max_model_len']}"

    def generate(self) -> str:
        engine = self._needs_engine()
        rollout = engine.generate(self._requests(2, 1.0, seed=0))[0]
        lengths = [len(c.token_ids) for c in rollout.completions]
        assert len(rollout.completions) == 2 and all(len(c.logprobs) == len(c.token_ids) for c in rollout.completions)
        return f"2 completions, {lengths} tokens, logprobs {[round(c.logprobs[0], 3) for c in rollout.completions]}"

    def _hf(self):
        if self.hf is None:
            from raylign.models.loading import load_model

            self.hf = load_model(self.model_dir, dtype="bfloat16", device="cuda")
        return self.hf

    def load_tensor(self) -> str:
        engine, model = self._needs_engine(), self._hf()
        before = engine.model_fingerprint()
        name, p = next((n, p) for n, p in model.named_parameters() if "layers.0.mlp.up_proj" in n)
        with self.torch.no_grad():
            p.add_(0.5)
        engine.load_weights([(name, p.detach())], version=1)
        after = engine.model_fingerprint()
        assert after != before, "fingerprint unchanged"
        return f"{name}: fingerprint {before:.6g} -> {after:.6g}"

    def vision_cache(self) -> str:
        engine, model = self._needs_engine(), self._hf()
        greedy = self._requests(1, 0.0)
        before = engine.generate(greedy)[0].completions[0]
        with self.torch.no_grad():
            vision = [(n, p.add_(0.5 * self.torch.randn_like(p)).detach()) for n, p in model.named_parameters() if ".visual." in n]
        engine.load_weights(vision, version=2)
        after = engine.generate(greedy)[0].completions[0]
        assert (before.token_ids, before.logprobs) != (after.token_ids, after.logprobs), "same output after a vision update"
        return f"{len(vision)} vision tensors; first logprob {before.logprobs[0]:.4f} -> {after.logprobs[0]:.4f}"

    def sleep_wake(self) -> str:
        self.engine = None  # one engine at a time on the GPU
        self.torch.cuda.empty_cache()
        model, out = self._hf(), []
        for level in (1, 2):
            engine, _ = self.engine_build(sleep=True)
            engine.sleep_level = level
            free = self.torch.cuda.mem_get_info()[0]
            engine.sleep()
            freed = self.torch.cuda.mem_get_info()[0] - free
            engine.wake()
            engine.load_weights(list(model.named_parameters()), version=3)
            rollout = engine.generate(self._requests(1, 0.0))[0]
            out.append(f"level {level}: freed {freed / 2**30:.2f} GiB, {len(rollout.completions[0].token_ids)} tokens")
            del engine
            self.torch.cuda.empty_cache()
        return "; ".join(out)

    def _learner(self, zero_stage: int):
        from raylign.config import LearnerConfig, ModelConfig, TrainConfig
        from raylign.learner.learner import Learner

        return Learner(
            ModelConfig(name_or_path=str(self.model_dir)),
            TrainConfig(per_device_train_batch_size=2),
            LearnerConfig(num_learners=0, zero_stage=zero_stage, precision="bf16"),
            2,
            device=self.torch.device("cuda", 0),
        )

    def zero(self, stage: int) -> str:
        from raylign.config import load_config
        from raylign.learner.objectives import make_objective

        learner = self._learner(stage)
        cfg = load_config(None, [f"--model.name_or_path={self.model_dir}", "--data.train=x"], method="sft")
        result = learner.update(sft_rows(4), make_objective(cfg))
        if self.engine is None:
            self.engine, _ = self.engine_build()
        greedy = self._requests(1, 0.0)
        before = self.engine.generate(greedy)[0].completions[0].token_ids
        buckets = 0
        for bucket in learner.iter_weight_buckets(16.0, False):
            self.engine.load_weights(bucket)
            buckets += 1
        self.engine.set_version(10 + stage)
        after = self.engine.generate(greedy)[0].completions[0].token_ids
        learner.close()
        return f"loss {result.metrics.get('loss', float('nan')):.4f}; {buckets} buckets synced; tokens changed: {before != after}"

    def nccl(self) -> str:
        if self.torch.cuda.device_count() < 2:
            raise Skip(f"{self.torch.cuda.device_count()} GPU(s); needs 2")
        self.engine = None
        self.torch.cuda.empty_cache()
        from raylign.sync.collective import open_store

        store = open_store(120.0, host="127.0.0.1")  # both processes rendezvous here
        common = [sys.executable, __file__, f"--nccl-port={store.port}", f"--model={self.model_dir}"]
        engine = subprocess.Popen([*common, "--nccl-role=engine"], env={**os.environ, "CUDA_VISIBLE_DEVICES": "1"},
                                  stdout=subprocess.PIPE, text=True)  # fmt: skip
        sender = subprocess.run([*common, "--nccl-role=sender"], env={**os.environ, "CUDA_VISIBLE_DEVICES": "0"},
                                capture_output=True, text=True, timeout=240, check=False)  # fmt: skip
        out, _ = engine.communicate(timeout=240)
        if sender.returncode or engine.returncode:
            raise RuntimeError(f"sender rc {sender.returncode}: {sender.stderr[-300:]}; engine rc {engine.returncode}")
        return out.strip().splitlines()[-1]


def sft_rows(n: int) -> list[dict]:
    from raylign.data.synthetic import format_answer, generate_example

    rows = []
    for i in range(n):
        ex = generate_example("color", i)
        user = {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": ex.question}]}
        answer = {"role": "assistant", "content": [{"type": "text", "text": format_answer(ex.reasoning, ex.answer)}]}
        rows.append({"messages": [user, answer], "images": [ex.image]})
    return rows


def nccl_role(args: argparse.Namespace) -> int:
    """One side of the two-GPU check: rank 0 sends a perturbed copy of the weights over NCCL, rank 1 is
    a vLLM engine whose worker receives them (the collective transport's two ends, without Ray)."""
    import torch

    from raylign.models.loading import load_model
    from raylign.sync.buckets import WeightLayout, iter_bucket_views, layout_of
    from raylign.sync.collective import GroupSpec, WeightGroup, send_buckets

    spec = GroupSpec("127.0.0.1", args.nccl_port, 2, "nccl", 120.0, tag="gpu-smoke")
    device = "cuda" if args.nccl_role == "sender" else "cpu"  # the engine side needs only the layout
    model = load_model(args.model, dtype="bfloat16", device=device)
    layout = WeightLayout(layout_of(model, 16.0), "cuda")
    if args.nccl_role == "sender":
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.05 * torch.randn_like(p))
        group = WeightGroup(spec, 0, None, "127.0.0.1")
        sent = send_buckets(iter_bucket_views(model, 16.0), layout, group)
        print(f"sent {sent / 2**20:.1f} MiB in {len(layout.buckets)} buckets", flush=True)
        group.close()
        return 0
    from raylign.rollout.vllm import VLLMEngine

    engine = VLLMEngine(args.model, gpu_memory_utilization=args.gpu_memory_utilization, max_model_len=1024)
    before = engine.model_fingerprint()
    engine.join_weight_group(spec, 1, "127.0.0.1")
    engine.receive_weights(spec.tag, layout, 1)
    after = engine.model_fingerprint()
    print(f"NCCL sync of {layout.num_tensors} tensors into vLLM's worker: fingerprint {before:.6g} -> {after:.6g}")
    return 0 if after != before else 1


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.list:
        print("\n".join(CHECKS))
        return 0
    if args.nccl_role:
        return nccl_role(args)
    report = Report()
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        try:
            smoke = Smoke(args, Path(tmp))
        except Skip as why:
            for name in selected(args.only):
                report.run(name, _skipper(str(why)))
            return 0
        methods = {"engine": smoke.check_engine, "zero2": lambda: smoke.zero(2), "zero3": lambda: smoke.zero(3)}
        for name in selected(args.only):
            report.run(name, methods.get(name) or getattr(smoke, name))
    print(f"total {time.perf_counter() - start:.0f}s", flush=True)
    return 1 if report.failed else 0


def _skipper(reason: str) -> Callable[[], str]:
    def skip() -> str:
        raise Skip(reason)

    return skip


if __name__ == "__main__":
    sys.exit(main())
