"""`raylign grpo|gspo`: the online loop.

    prompts -> RolloutGroup (num_generations per prompt) -> RewardGroup -> group advantages
            -> LearnerGroup.update -> WeightBroadcaster -> RolloutGroup ...

Rollouts for the next ``max_staleness`` steps are generated while the learner trains (the update
runs in a helper thread while this thread keeps the rollout workers fed). A rollout worker or
reward worker that dies is replaced by its group and its prompts re-queued; a learner that dies
ends the run with the command that resumes it from the last checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import ray
from tqdm.auto import tqdm

from raylign.config import RaylignConfig, config_to_dict, save_config
from raylign.driver import common
from raylign.driver.batching import batch_metrics, sample_rows, train_samples
from raylign.driver.common import LearnerFailed
from raylign.driver.evaluate import evaluate
from raylign.driver.metrics import MetricsLogger
from raylign.driver.pipeline import RolloutPipeline, StepBatch
from raylign.driver.sampler import PromptSampler
from raylign.learner.group import LearnerGroup
from raylign.learner.objectives import make_objective
from raylign.models.loading import load_processor
from raylign.protocol import TrainBatch, UpdateResult
from raylign.rewards.errors import RewardErrorLog
from raylign.rewards.group import RewardGroup
from raylign.rollout.engine import EngineSpec
from raylign.rollout.group import RolloutGroup
from raylign.rollout.worker import WorkerResources
from raylign.sync.broadcaster import WeightBroadcaster
from raylign.sync.transports import SyncError

logger = logging.getLogger(__name__)


def engine_kwargs(cfg: RaylignConfig, device: str) -> dict:
    """The engine constructor's options: the rollout section in the terms of the engine it names.

    vLLM takes ``EngineArgs`` fields only (``VLLMEngine`` refuses others): no ``batch_size`` (it
    schedules every prompt it gets), and ``max_model_len`` unset means prompt + completion limits,
    not the model's whole context (vLLM would size its KV cache for that).
    """
    r = cfg.rollout
    if r.engine == "vllm":
        max_len = r.max_model_len or cfg.data.max_prompt_length + cfg.grpo.max_completion_length
        return {**r.engine_kwargs, "tensor_parallel_size": r.tensor_parallel_size,
                "gpu_memory_utilization": r.gpu_memory_utilization, "max_model_len": max_len,
                "enable_sleep_mode": r.enable_sleep_mode}
    return {"batch_size": r.batch_size, "device": device, **r.engine_kwargs}


def build_rollouts(cfg: RaylignConfig, learners: LearnerGroup | None = None) -> RolloutGroup:
    """The rollout workers; with ``rollout.colocate``, one engine inside each of ``learners``' actors."""
    r = cfg.rollout
    gpus = r.num_gpus_per_worker
    if gpus is None:
        gpus = float(r.tensor_parallel_size) if ray.cluster_resources().get("GPU", 0) > 0 else 0.0
    kwargs = engine_kwargs(cfg, "cuda" if gpus > 0 else "cpu")
    spec = EngineSpec(kind=r.engine, model_path=cfg.model.name_or_path, kwargs=kwargs)
    resources = WorkerResources(num_cpus=r.num_cpus_per_worker, num_gpus=gpus, resources=dict(r.resources))
    if r.colocate and learners is not None and learners.actors:
        return RolloutGroup(len(learners.actors), spec, actors=learners.actors)
    return RolloutGroup(r.num_workers, spec, resources=resources, resource_timeout_s=common.resource_timeout_s(cfg))


def build_rewards(cfg: RaylignConfig) -> RewardGroup:
    rw = cfg.reward
    return RewardGroup(rw.funcs, rw.reward_weights, num_workers=rw.num_workers, timeout_s=rw.timeout_s,
                       num_processes=rw.processes_per_worker, output_lines=rw.output_lines,
                       max_memory_mb=rw.max_memory_mb, resource_timeout_s=common.resource_timeout_s(cfg))


class OnlineRun:
    """The parts of one GRPO/GSPO run and its loop; ``run(cfg)`` is the entry point."""

    def __init__(self, cfg: RaylignConfig):
        cfg = common.materialize(cfg)
        self.cfg = cfg
        self.run_dir = cfg.run_dir
        self.resume_from = common.resolve_resume(cfg)
        save_config(cfg, self.run_dir)
        g = cfg.grpo
        processor = load_processor(cfg.model.name_or_path)
        self.train_ds, self.eval_ds = common.load_job_data(cfg, processor, "prompt")
        self.total_steps = common.num_steps(cfg, len(self.train_ds), g.prompts_per_step)
        self.objective = make_objective(cfg)
        common.init_ray(cfg)
        self.learners = LearnerGroup(cfg.model, cfg.train, cfg.learner, self.total_steps * g.num_iterations,
                                     resource_timeout_s=common.resource_timeout_s(cfg),
                                     reference=self.objective.needs_reference, seed=cfg.seed,
                                     colocated=cfg.rollout.colocate)
        self.rollouts = build_rollouts(cfg, self.learners)
        self.rewards = build_rewards(cfg)
        self.broadcaster = WeightBroadcaster(self.learners, self.rollouts, cfg.sync,
                                             trainable_only=cfg.model.freeze_vision_tower or cfg.model.lora.r > 0)
        self.sampler = PromptSampler(len(self.train_ds), seed=cfg.seed, shuffle=cfg.data.shuffle)
        self.start_step = 0
        self.last_checkpoint: Path | None = None
        self.reward_errors = RewardErrorLog()  # failing reward functions: progress bar and reward_errors.json
        self._new_reward_errors: list[str] = []
        self._proximal_s = 0.0  # seconds the last step spent recomputing proximal logprobs
        if self.resume_from is not None:
            self._restore(self.resume_from)
        self.pipeline = RolloutPipeline(self.rollouts, self.rewards, self.train_ds, self.sampler, g,
                                        self.total_steps, seed=cfg.seed, num_iterations=g.num_iterations,
                                        sync_workers=self._sync_new_workers)
        # Which prompts each step trained on: the exactly-once record across failures and restarts.
        self._audit = open(self.run_dir / "prompts.jsonl", "a" if self.resume_from else "w", buffering=1)
        self.log = MetricsLogger(self.run_dir, cfg.logging.report_to, config=config_to_dict(cfg),
                                 project=cfg.logging.project, run_name=cfg.run_name,
                                 resume=self.resume_from is not None, resume_step=self.start_step)

    # ------------------------------------------------------------------ checkpoints

    def _restore(self, path: Path) -> None:
        state = self.learners.restore(path)
        self.sampler.load_state_dict(state["sampler"])
        self.start_step = int(state["step"])
        self.last_checkpoint = path
        self.broadcaster.broadcast(self.learners.step)  # engines start from the initial weights
        self._sync_starting_engines()
        logger.info("resumed from %s at step %d", path, self.start_step)

    def _sync_starting_engines(self) -> None:
        """Wait for engines still starting at the restore's broadcast, then give them the restored weights.

        A fresh run needs no wait: engines start with version 0, the initial weights. After a restore an
        engine that missed the sync could take no work and the run would stop; slow starts (a large vLLM
        engine) are normal, so they get up to ``resource_timeout_s`` more.
        """
        stale = set(self.rollouts.workers_needing_sync())
        if not stale or self.rollouts.local is not None:
            return
        pings = [handle.ping.remote() for worker_id, handle in self.rollouts.workers if worker_id in stale]
        ray.wait(pings, num_returns=len(pings), timeout=common.resource_timeout_s(self.cfg))
        self._sync_new_workers(sorted(stale))

    def _save(self, step: int) -> Path:
        path = common.checkpoint_dir(self.run_dir, step)
        try:
            self.learners.save(path, {"sampler": self.sampler.state_dict(), "step": step})
        except ray.exceptions.RayActorError as err:
            raise self._learner_failed(err) from err
        common.mark_complete(path)
        self.last_checkpoint = path
        if self.cfg.train.save_total_limit:
            common.prune_checkpoints(self.run_dir, self.cfg.train.save_total_limit)
        return path

    def _sync_new_workers(self, worker_ids: list[str]) -> None:
        """Give replaced rollout workers the current weights; one that dies too is retried next time."""
        try:
            self.broadcaster.sync_workers(worker_ids)
        except SyncError as err:
            logger.warning("syncing replaced rollout workers %s: %s", worker_ids, err)

    # ------------------------------------------------------------------ one step

    def scale_rollouts(self, num_workers: int) -> None:
        """Grow or shrink the rollout workers while the run goes on (new ones get weights before work)."""
        if not self.rollouts.resizable:
            raise ValueError("the engines run in the driver (rollout.num_workers=0) or inside the learner "
                             "actors (rollout.colocate): there is nothing to scale")
        if num_workers < 1:
            raise ValueError(f"a run needs at least 1 rollout worker, asked for {num_workers}")
        current = self.rollouts.num_workers
        if num_workers > current:
            self.rollouts.add_workers(num_workers - current)
            self._sync_new_workers(self.rollouts.workers_needing_sync())
        elif num_workers < current:
            self.rollouts.remove_workers(current - num_workers)
        logger.info("rollout workers: %d -> %d", current, num_workers)

    def _requested_rollout_workers(self) -> int | None:
        """``echo 4 > RUN_DIR/rollout_workers`` asks a running job for 4 rollout workers."""
        path = self.run_dir / "rollout_workers"
        if not path.is_file():
            return None
        text = path.read_text().strip()
        if not text.isdigit():
            logger.warning("%s: expected a whole number of workers, found %r; ignored", path, text)
            return None
        return int(text)

    def _learner_failed(self, err: Exception) -> LearnerFailed:
        return LearnerFailed(
            f"a learner died ({type(err).__name__}); last checkpoint: {self.last_checkpoint or 'none'}. "
            f"Resume with: {common.resume_command(self.cfg, self.last_checkpoint)}"
        )

    def _version(self) -> int:
        """The learners' policy version (optimizer steps taken)."""
        try:
            return self.learners.step
        except ray.exceptions.RayActorError as err:
            raise self._learner_failed(err) from err

    def _update(self, batch: TrainBatch) -> list[UpdateResult]:
        try:
            if self.cfg.grpo.num_iterations > 1:
                batch = self._with_proximal(batch)
            return [self.learners.update(batch, self.objective) for _ in range(self.cfg.grpo.num_iterations)]
        except ray.exceptions.RayActorError as err:
            raise self._learner_failed(err) from err

    def _with_proximal(self, batch: TrainBatch) -> TrainBatch:
        """``batch`` with the learner's logprobs for the current weights (decoupled PPO's proximal policy).

        Later passes over a batch clip against these; the first pass needs none (its weights ARE the
        proximal ones, so the loss reads its own detached logprobs), hence one pass = no recompute.
        """
        start = time.perf_counter()
        rows = self.learners.logprobs(list(batch.samples), self.objective, self.cfg.grpo.temperature)
        samples = tuple(
            dataclasses.replace(s, proximal_logprobs=tuple(r.tolist())) for s, r in zip(batch.samples, rows)
        )
        self._proximal_s = time.perf_counter() - start
        return TrainBatch(samples, batch.policy_version)

    def _train_overlapped(self, batch: TrainBatch) -> list[UpdateResult]:
        """Run the update in a helper thread while this thread keeps the rollout workers fed."""
        with ThreadPoolExecutor(1) as pool:
            future = pool.submit(self._update, batch)
            while not future.done():
                self.rollouts.poll()
                time.sleep(0.02)
            return future.result()

    def step(self, step: int) -> dict[str, float]:
        t0 = time.perf_counter()
        version = self._version()
        try:
            got: StepBatch = self.pipeline.next_batch(step)
        except ray.exceptions.RayActorError as err:  # the rollout group replaces its own; not a learner's
            if not self.rollouts.colocated:
                raise
            raise self._learner_failed(err) from err
        self._new_reward_errors = self.reward_errors.update(step + 1, got.groups)
        samples = train_samples(got.groups, self.cfg.grpo)
        t1 = time.perf_counter()
        batch = TrainBatch(tuple(samples), version)
        if self.cfg.rollout.colocate:  # the engines share the learner actors' devices: freed for the update
            self.rollouts.sleep()
            try:
                results = self._update(batch)
            finally:
                self.rollouts.wake()
        else:
            results = self._train_overlapped(batch)
        t2 = time.perf_counter()
        for grp in got.groups:
            self.sampler.done(grp.rollout.request.uid)
        uids = [grp.rollout.request.uid for grp in got.groups]
        workers = [grp.rollout.worker for grp in got.groups]  # who sampled each prompt (node failures, scaling)
        self._audit.write(json.dumps({"step": step + 1, "uids": uids, "workers": workers}) + "\n")
        try:
            sync = self.broadcaster.broadcast(self._version())
        except SyncError as err:  # the dead receiver is replaced; it is synced before it gets work
            self._version()  # unless the sender died: a dead learner ends the run here, naming the resume command
            logger.warning("weight sync: %s", err)
            sync = {"sync/failed": 1.0}
        self.pipeline.fill(step + 1)  # the new weights open the next step's staleness window
        t3 = time.perf_counter()
        tokens = sum(len(s.completion_ids) for s in samples)
        workers = max(1, self.rollouts.num_workers)
        metrics = {
            **batch_metrics(got.groups, version, self.cfg.grpo.num_iterations),
            **results[-1].metrics,
            **sync,
            "time/wait": got.wait_s,
            "time/generate": got.generate_s / workers,
            "time/reward": got.reward_s,
            "time/train": t2 - t1,
            "time/proximal": self._proximal_s,  # inside time/train; 0 when num_iterations is 1
            "time/sync": t3 - t2,
            "time/step": t3 - t0,
            "throughput/generate_tokens_per_s": tokens * workers / got.generate_s if got.generate_s else 0.0,
            "throughput/train_tokens_per_s": tokens * len(results) / (t2 - t1),
            "prompts/trained": float(self.sampler.trained),
            "prompts/filtered": float(self.sampler.filtered),
            **{f"rollout/{k}": float(v) for k, v in self.rollouts.stats().items()},
            "reward_workers/restarts": float(self.rewards.restarts),
        }
        if self.cfg.grpo.log_completions_steps and (step + 1) % self.cfg.grpo.log_completions_steps == 0:
            self.log.log_samples(step + 1, sample_rows(got.groups, self.cfg.grpo.num_completions_to_print))
        return metrics

    # ------------------------------------------------------------------ the loop

    def _evaluate(self) -> dict[str, float]:
        if self.eval_ds is None:
            return {}
        return evaluate(self.rollouts, self.rewards, self.eval_ds, self.cfg.grpo)[0]

    def train(self) -> Path:
        t = self.cfg.train
        bar = tqdm(range(self.start_step, self.total_steps), initial=self.start_step, total=self.total_steps,
                   desc=f"{self.cfg.method}", disable=not self.cfg.logging.progress_bar, dynamic_ncols=True)
        evals = {}
        if t.eval_steps and self.start_step == 0:  # the baseline every later eval is compared with
            evals = self._evaluate()
            self.log.log(0, evals)
        for step in bar:
            wanted = self._requested_rollout_workers()
            if wanted is not None and wanted != self.rollouts.num_workers and self.rollouts.resizable:
                self.scale_rollouts(wanted)
            metrics = self.step(step)
            done = step + 1
            if t.eval_steps and (done % t.eval_steps == 0 or done == self.total_steps):
                evals = self._evaluate() or evals
                metrics.update(evals)
            self.log.log(done, metrics)
            postfix = {k: f"{v:.3g}" for k, v in (
                ("reward", metrics["reward/mean"]), ("acc", evals.get("eval/accuracy", metrics.get("accuracy"))),
                ("stale", metrics["staleness/max"]), ("s/step", metrics["time/step"])) if v is not None}
            self._show_reward_errors(bar, postfix)
            bar.set_postfix(postfix)
            if (t.save_steps and done % t.save_steps == 0) or done == self.total_steps:
                self._save(done)
        return self.run_dir

    def _show_reward_errors(self, bar, postfix: dict[str, str]) -> None:
        """A reward function failing: one line the first time (name, count, message), then a count on the bar."""
        for line in self._new_reward_errors:
            bar.write(f"raylign: {line}")
            logger.warning(line)
        if self._new_reward_errors or self.reward_errors.failing():
            self.reward_errors.save(self.run_dir)
        text = self.reward_errors.postfix()
        if text:
            postfix["reward_errors"] = text

    def close(self) -> None:
        """Stop every part; a part that already died is logged and the others still stop."""
        self.log.close()
        self._audit.close()
        for name, stop in (("broadcaster", self.broadcaster.close), ("rewards", self.rewards.close),
                           ("rollouts", self.rollouts.shutdown), ("learners", self.learners.shutdown)):
            try:
                stop()
            except ray.exceptions.RayError as err:
                logger.warning("shutting down %s: %s", name, err)


def run(cfg: RaylignConfig) -> Path:
    """Run GRPO/GSPO as ``cfg`` says; returns the run directory."""
    job = OnlineRun(cfg)
    try:
        return job.train()
    finally:
        job.close()
