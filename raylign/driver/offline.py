"""`raylign sft|dpo|mpo`: the offline loop.

    dataset -> seeded epoch permutations -> global batches -> LearnerGroup.update -> metrics, eval, checkpoints

One optimizer step takes ``per_device_train_batch_size * gradient_accumulation_steps * max(1, num_learners)``
rows: the next rows of the concatenated epochs, each epoch a permutation seeded by ``(seed, epoch)``
(``PromptSampler``). Batches therefore never come up short (an epoch boundary falls inside a batch),
and a checkpoint needs only the position ``(epoch, cursor)`` to resume exactly: steps ``k+1..`` of a
run resumed from step ``k`` equal those of an uninterrupted run.

DPO/MPO with ``dpo.precompute_ref_log_probs`` compute the summed reference logprobs of every pair once
before the first update (the policy *is* the reference then), keep them in the driver and in every
checkpoint (a resumed policy is no longer the reference), and attach them to each batch's rows as
TRL's ``ref_chosen_logps``/``ref_rejected_logps`` columns, so the learners keep no reference model.

``learner.num_learners: 0`` trains in this process and starts no Ray at all. A learner actor that
dies ends the run with the command that resumes it from the last checkpoint.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import ray
import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from raylign.config import RaylignConfig, config_to_dict, save_config
from raylign.data.datasets import VLMDataset
from raylign.driver import common
from raylign.driver.common import LearnerFailed
from raylign.driver.metrics import MetricsLogger
from raylign.driver.offline_eval import GreedyJudge, OfflineEvaluator, pair_sums, row_logprobs
from raylign.driver.sampler import PromptSampler
from raylign.learner.group import LearnerGroup
from raylign.learner.objectives import REF_CHOSEN, REF_REJECTED, make_objective
from raylign.models.loading import load_processor

logger = logging.getLogger(__name__)

DATA_KINDS = {"sft": "sft", "dpo": "preference", "mpo": "preference"}  # method -> dataset kind
REF_LOGPS_FILE = "ref_logps.safetensors"  # precomputed reference logprobs, in each checkpoint
FORWARD_BATCHES = 4  # micro-batches per learner in one forward-only call (bounds driver memory)


def rows_per_step(cfg: RaylignConfig) -> int:
    """Rows in one optimizer step (the global batch)."""
    t = cfg.train
    return t.per_device_train_batch_size * t.gradient_accumulation_steps * max(1, cfg.learner.num_learners)


class OfflineRun:
    """The parts of one SFT/DPO/MPO run and its loop; ``run(cfg)`` is the entry point."""

    def __init__(self, cfg: RaylignConfig):
        if cfg.method not in DATA_KINDS:
            raise ValueError(f"the offline driver runs {', '.join(DATA_KINDS)}, not {cfg.method!r}")
        cfg = common.materialize(cfg)
        self.cfg, self.run_dir = cfg, cfg.run_dir
        self.resume_from = common.resolve_resume(cfg)
        save_config(cfg, self.run_dir)
        processor = load_processor(cfg.model.name_or_path)
        self.train_ds, self.eval_ds = common.load_job_data(cfg, processor, DATA_KINDS[cfg.method])
        self.batch_rows = rows_per_step(cfg)
        self.total_steps = common.num_steps(cfg, len(self.train_ds), self.batch_rows)
        self.objective = make_objective(cfg)
        self.running = copy.deepcopy(self.objective)  # the driver's copy of objective state (bco_pair mean)
        self.precompute = cfg.method != "sft" and cfg.dpo.precompute_ref_log_probs
        self.forward_rows = cfg.train.per_device_train_batch_size * max(1, cfg.learner.num_learners) * FORWARD_BATCHES
        self.last_checkpoint: Path | None = self.resume_from
        if cfg.learner.num_learners > 0:
            common.init_ray(cfg)
        with self._learner_calls("start"):
            self.learners = LearnerGroup(cfg.model, cfg.train, cfg.learner, self.total_steps,
                                         resource_timeout_s=common.resource_timeout_s(cfg),
                                         reference=self.objective.needs_reference, seed=cfg.seed)
        self.sampler = PromptSampler(len(self.train_ds), seed=cfg.seed, shuffle=cfg.data.shuffle)
        self.start_step = 0
        self.ref_logps: dict[str, torch.Tensor] = {}
        try:
            if self.resume_from is not None:
                self._restore(self.resume_from)
            elif self.precompute:
                self.ref_logps = self._reference_logps()
            self.evaluator = self._evaluator(processor)
        except BaseException:
            self.learners.shutdown()  # nobody else holds the group yet
            raise
        self.log = MetricsLogger(self.run_dir, cfg.logging.report_to, config=config_to_dict(cfg),
                                 project=cfg.logging.project, run_name=cfg.run_name,
                                 resume=self.resume_from is not None, resume_step=self.start_step)

    # ------------------------------------------------------------------ parts

    @contextlib.contextmanager
    def _learner_calls(self, what: str) -> Iterator[None]:
        """Turn a dead learner actor into an error that names the last checkpoint and the resume command."""
        try:
            yield
        except ray.exceptions.RayError as err:
            # A dead rank can surface first as a live rank's collective error ("connection closed by peer").
            if not isinstance(err, ray.exceptions.RayActorError) and not self._learner_died():
                raise
            raise LearnerFailed(
                f"a learner died during {what} ({type(err).__name__}); last checkpoint: "
                f"{self.last_checkpoint or 'none'}. Resume with: "
                f"{common.resume_command(self.cfg, self.last_checkpoint)}"
            ) from err

    def _learner_died(self) -> bool:
        """Whether any learner actor is dead (asked after a failed call)."""
        learners = getattr(self, "learners", None)  # None while the group is starting
        for actor in learners.actors if learners is not None else ():
            try:
                ray.get(actor.step.remote(), timeout=60)
            except ray.exceptions.RayActorError:
                return True
            except ray.exceptions.RayError:  # alive but failing: the original error says why
                continue
        return False

    def _sequence_logps(self, dataset: VLMDataset) -> torch.Tensor:
        """``[rows, 2]`` summed (chosen, rejected) logprobs of the current policy, float64.

        Summed here as the evaluator sums (not ``LearnerGroup.sequence_logps``' float32 sums), so the
        eval rewards of the untrained policy are exactly 0.
        """
        with self._learner_calls("reference logprobs"):
            return pair_sums(row_logprobs(self.learners, self.objective, dataset, self.forward_rows))

    def _reference_logps(self) -> dict[str, torch.Tensor]:
        """Reference logprobs of the train (and eval) pairs, computed before the first update."""
        out = {"train": self._sequence_logps(self.train_ds)}
        if self.eval_ds is not None:
            out["eval"] = self._sequence_logps(self.eval_ds)
        logger.info("precomputed reference logprobs of %d train pairs", len(out["train"]))
        return out

    def _evaluator(self, processor) -> OfflineEvaluator | None:
        if self.eval_ds is None or not self.cfg.train.eval_steps:
            return None
        judge = GreedyJudge(self.cfg.model.name_or_path, self.eval_ds, processor, self.cfg.data.max_length)
        return OfflineEvaluator(self.eval_ds, self.objective, judge, running=self.running,
                                reference=self.ref_logps.get("eval"), chunk_rows=self.forward_rows)

    def _rows(self, indices: list[int]) -> list[dict[str, Any]]:
        """The training rows at ``indices``, with their precomputed reference logprobs attached."""
        rows = self.train_ds.rows(indices)
        if self.precompute:
            ref = self.ref_logps["train"]
            for row, i in zip(rows, indices):
                row[REF_CHOSEN], row[REF_REJECTED] = float(ref[i, 0]), float(ref[i, 1])
        return rows

    @property
    def epoch(self) -> float:
        """Epochs done so far, fractional."""
        return self.sampler.epoch + self.sampler.cursor / self.sampler.num_rows

    # ------------------------------------------------------------------ checkpoints

    def _restore(self, path: Path) -> None:
        with self._learner_calls("restore"):
            state = self.learners.restore(path)
        if state.get("train_rows") != len(self.train_ds):
            raise ValueError(
                f"{path} was saved while training on {state.get('train_rows')} rows, this run has "
                f"{len(self.train_ds)}; resume with the same data (data.train, data.eval_split_size, data filters)"
            )
        self.sampler.load_state_dict(state["sampler"])
        self.running.load_state_dict(state.get("objective", {}))
        self.start_step = int(state["step"])
        if self.precompute:
            if not (path / REF_LOGPS_FILE).is_file():
                raise FileNotFoundError(
                    f"{path} has no {REF_LOGPS_FILE}: it was not saved by a run with dpo.precompute_ref_log_probs; "
                    "resume with the same dpo settings"
                )
            self.ref_logps = load_file(path / REF_LOGPS_FILE)
        self.last_checkpoint = path
        logger.info("resumed from %s at step %d (epoch %.2f)", path, self.start_step, self.epoch)

    def _save(self, step: int) -> Path:
        path = common.checkpoint_dir(self.run_dir, step)
        state = {"sampler": self.sampler.state_dict(), "step": step, "objective": self.running.state_dict(),
                 "train_rows": len(self.train_ds)}
        with self._learner_calls("save"):
            self.learners.save(path, state)
        if self.ref_logps:
            save_file({k: v.contiguous() for k, v in self.ref_logps.items()}, path / REF_LOGPS_FILE)
        common.mark_complete(path)
        self.last_checkpoint = path
        if self.cfg.train.save_total_limit:
            common.prune_checkpoints(self.run_dir, self.cfg.train.save_total_limit)
        return path

    # ------------------------------------------------------------------ the loop

    def step(self) -> dict[str, float]:
        """One optimizer step over the next global batch; its metrics."""
        start = time.perf_counter()
        picked = [self.sampler.take() for _ in range(self.batch_rows)]
        rows = self._rows([row for _, row in picked])
        read = time.perf_counter()
        with self._learner_calls("the update"):
            result = self.learners.update(rows, self.objective)
        for uid, _ in picked:
            self.sampler.done(uid)
        self.running.after_step(result.metrics, result.skipped)
        end = time.perf_counter()
        return {
            **result.metrics,
            "epoch": self.epoch,
            "time/data": read - start,
            "time/step": end - start,
            "throughput/rows_per_s": len(rows) / (end - start),
        }

    def _evaluate(self, step: int) -> dict[str, float]:
        with self._learner_calls("evaluation"):
            metrics, samples = self.evaluator.evaluate(self.learners)
        if samples:
            self.log.log_samples(step, samples)
        return metrics

    def train(self) -> Path:
        """Steps ``start_step + 1 .. total_steps``; evaluation at step 0 (fresh runs), every ``eval_steps`` and
        at the end; a checkpoint every ``save_steps`` and at the end. Returns the run directory."""
        t = self.cfg.train
        bar = tqdm(range(self.start_step, self.total_steps), initial=self.start_step, total=self.total_steps,
                   desc=self.cfg.method, disable=not self.cfg.logging.progress_bar, dynamic_ncols=True)
        evals: dict[str, float] = {}
        if self.evaluator is not None and self.start_step == 0:
            evals = self._evaluate(0)
            self.log.log(0, {"epoch": 0.0, **evals})
        for step in bar:
            metrics = self.step()
            done = step + 1
            evaluated = self.evaluator is not None and (done % t.eval_steps == 0 or done == self.total_steps)
            if evaluated:
                evals = self._evaluate(done)
                metrics.update(evals)
            if evaluated or done % t.logging_steps == 0 or done == self.total_steps:
                self.log.log(done, metrics)
            bar.set_postfix({k: f"{v:.3g}" for k, v in (
                ("loss", metrics.get("loss")), ("acc", metrics.get("rewards/accuracies")),
                ("eval_loss", evals.get("eval/loss")), ("eval_acc", evals.get("eval/accuracy")),
                ("tok/s", metrics.get("throughput/tokens_per_s"))) if v is not None})
            if (t.save_steps and done % t.save_steps == 0) or done == self.total_steps:
                self._save(done)
        return self.run_dir

    def close(self) -> None:
        self.log.close()
        try:
            self.learners.shutdown()
        except ray.exceptions.RayActorError as err:  # a dead rank cannot leave the group: the run failed already
            logger.warning("learner shutdown after a learner died (%s); killing the remaining actors", err)
            for actor in self.learners.actors:
                ray.kill(actor)


def run(cfg: RaylignConfig) -> Path:
    """Run SFT/DPO/MPO as ``cfg`` says; returns the run directory."""
    job = OfflineRun(cfg)
    try:
        return job.train()
    finally:
        job.close()
