"""Held-out evaluation of an offline run (SFT, DPO, MPO), forward only.

- ``eval/loss`` for every method, from the learners' per-row target logprobs, normalised as the
  training loss is (SFT: token or sequence mean NLL; DPO/MPO: ``dpo_loss`` over all eval pairs);
- DPO/MPO: TRL's reward metrics on the eval pairs (``eval/rewards/accuracies``, ``eval/rewards/margins``, ...);
- ``eval/accuracy``: exact match of greedy answers. Up to ``EVAL_GENERATE_ROWS`` held-out prompts are
  decoded with temperature 0 by a transformers engine in the driver holding the learners' current
  weights; the text inside ``<answer>...</answer>`` must equal the row's gold answer (its
  ``solution`` column, else the ``<answer>`` of its reference completion). Rows without a gold
  answer are not generated at all.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch

from raylign.algos.dpo import dpo_loss
from raylign.data.chat import to_messages
from raylign.data.collate import completion_messages_of
from raylign.data.datasets import VLMDataset
from raylign.driver.batching import prompt_text, thumbnail_b64
from raylign.learner.objectives import PreferenceObjective, SFTObjective
from raylign.protocol import RolloutRequest, SamplingParams

EVAL_GENERATE_ROWS = 64  # held-out prompts greedy-decoded per evaluation (the first ones: the same each time)
EXTRA_ANSWER_TOKENS = 16  # greedy budget beyond the longest reference completion
SAMPLES_LOGGED = 4  # greedy completions written to samples.jsonl per evaluation
_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


# ------------------------------------------------------------------ rows


def tagged_answer(text: str) -> str | None:
    """The inside of the last ``<answer>...</answer>`` block, or None when there is none."""
    found = _ANSWER.findall(text)
    return found[-1] if found else None


def _text(message: Mapping[str, Any]) -> str:
    content = message.get("content")
    if isinstance(content, str):
        return content
    return "".join(p.get("text") or "" for p in content or () if isinstance(p, Mapping))


def split_row(row: Mapping[str, Any]) -> tuple[list[dict[str, Any]], str]:
    """``(prompt messages, reference reply text)`` of an SFT row (``messages`` or ``prompt`` + ``completion``)
    or a preference row (the chosen reply)."""
    images = len(row.get("images") or ())
    if row.get("messages") is not None:
        messages = to_messages(row["messages"], images)
        last = max(i for i, m in enumerate(messages) if m.get("role") == "assistant")
        return messages[:last], _text(messages[last])
    reply = row["chosen"] if "chosen" in row else row["completion"]
    return to_messages(row["prompt"], images), "".join(_text(m) for m in completion_messages_of(reply))


def gold_answer(row: Mapping[str, Any]) -> str | None:
    """The answer a greedy completion must match: ``solution``, else the reference reply's ``<answer>``."""
    if row.get("solution") is not None:
        return str(row["solution"])
    return tagged_answer(split_row(row)[1])


def is_exact_match(completion: str, gold: str) -> bool:
    """The completion's tagged answer equals ``gold`` (whitespace and case ignored)."""
    answer = tagged_answer(completion)
    return answer is not None and answer.strip().casefold() == gold.strip().casefold()


def chunked_rows(dataset: VLMDataset, size: int) -> Iterator[list[dict[str, Any]]]:
    """Every row of ``dataset``, ``size`` at a time (bounds the images held in the driver)."""
    for start in range(0, len(dataset), size):
        yield dataset.rows(range(start, min(len(dataset), start + size)))


def row_logprobs(learners, objective: Any, dataset: VLMDataset, chunk: int, reference: bool = False) -> list[torch.Tensor]:
    """Per-row target logprobs of every row of ``dataset`` (``LearnerGroup.logprobs``, ``chunk`` rows a call)."""
    out: list[torch.Tensor] = []
    for rows in chunked_rows(dataset, chunk):
        out += learners.logprobs(rows, objective, reference=reference)
    return out


# ------------------------------------------------------------------ losses from per-row logprobs


def pair_sums(rows: Sequence[torch.Tensor]) -> torch.Tensor:
    """``[pairs, 2]`` float64 summed logprobs of per-row logprobs ``[chosen_0, rejected_0, chosen_1, ...]``."""
    if not rows:
        return torch.zeros(0, 2, dtype=torch.float64)
    return torch.stack([r.double().sum() for r in rows]).view(-1, 2)


def sft_eval_metrics(rows: Sequence[torch.Tensor], aggregation: str) -> dict[str, float]:
    """``eval/loss`` (the SFT loss of the whole eval set at once) and ``eval/nll`` (token mean)."""
    tokens = torch.cat([r.double() for r in rows]) if rows else torch.zeros(0, dtype=torch.float64)
    nll = float(-tokens.sum() / max(1, tokens.numel()))
    if aggregation == "sequence_mean":
        loss = float(torch.stack([-r.double().sum() / max(1, r.numel()) for r in rows]).mean())
    else:
        loss = nll
    return {"eval/loss": loss, "eval/nll": nll}


def preference_eval_metrics(
    rows: Sequence[torch.Tensor], reference: torch.Tensor, objective: PreferenceObjective
) -> dict[str, float]:
    """``dpo_loss`` over every eval pair at once, its components and TRL's reward metrics, as ``eval/...``.

    ``rows`` are per-row policy logprobs ``[chosen_0, rejected_0, chosen_1, ...]``; ``reference`` is
    ``[pairs, 2]`` summed reference logprobs. The ``sft`` term is the token mean over all chosen tokens;
    ``bco_pair`` is shifted by the objective's running mean as in training.
    """
    sums = pair_sums(rows)
    lengths = torch.tensor([float(r.numel()) for r in rows], dtype=torch.float64).view(-1, 2)
    chosen = [r.double() for r in rows[0::2]]
    chosen_nll = -torch.cat(chosen).sum() / lengths[:, 0].sum().clamp(min=1)
    shift = None
    if objective.bco_running_mean and "bco_pair" in objective.loss_cfg.loss_type:
        shift = torch.tensor(objective.bco_mean, dtype=torch.float64)
    ref = reference.double()
    _, metrics = dpo_loss(
        sums[:, 0], sums[:, 1], ref[:, 0], ref[:, 1], objective.loss_cfg, chosen_nll=chosen_nll,
        bco_reward_mean=shift, chosen_lengths=lengths[:, 0], rejected_lengths=lengths[:, 1],
    )
    return {f"eval/{k}": float(v) for k, v in metrics.items()}


# ------------------------------------------------------------------ greedy exact match


class GreedyJudge:
    """Greedy-decodes the first held-out prompts that have a gold answer and scores exact matches.

    The engine (``raylign.rollout.hf.TransformersEngine``, in this process) is built on first use
    from the policy's path; each evaluation loads the learners' current weights into it.
    """

    def __init__(self, model_path: str, dataset: VLMDataset, processor: Any, max_tokens_cap: int):
        first = dataset.rows(range(min(EVAL_GENERATE_ROWS, len(dataset))))
        self.rows = [(row, gold) for row in first if (gold := gold_answer(row)) is not None]
        longest = max((len(processor.tokenizer(split_row(r)[1]).input_ids) for r, _ in self.rows), default=0)
        self.max_tokens = max(1, min(max_tokens_cap, longest + EXTRA_ANSWER_TOKENS))
        self.model_path = model_path
        self.engine = None

    @property
    def enabled(self) -> bool:
        return bool(self.rows)

    def _engine(self):
        if self.engine is None:
            from raylign.rollout.hf import TransformersEngine

            device = "cuda" if torch.cuda.is_available() else "cpu"
            self.engine = TransformersEngine(self.model_path, device=device, batch_size=len(self.rows))
        return self.engine

    def evaluate(self, learners) -> tuple[dict[str, float], list[dict[str, Any]]]:
        """``{"eval/accuracy", "eval/answered"}`` and a few samples for ``samples.jsonl``."""
        engine = self._engine()
        for bucket in learners.weight_buckets():
            engine.load_weights(bucket)
        greedy = SamplingParams(n=1, temperature=0.0, max_tokens=self.max_tokens)
        requests = []
        for i, (row, _) in enumerate(self.rows):
            prompt, _ = split_row(row)
            requests.append(RolloutRequest(f"eval/r{i}", prompt, tuple(row.get("images") or ()), sampling=greedy))
        texts = [r.completions[0].text for r in engine.generate(requests)]
        golds = [gold for _, gold in self.rows]
        correct = [is_exact_match(t, g) for t, g in zip(texts, golds)]
        metrics = {
            "eval/accuracy": sum(correct) / len(correct),
            "eval/answered": sum(tagged_answer(t) is not None for t in texts) / len(texts),
        }
        samples = [
            {"uid": req.uid, "prompt": prompt_text(req.prompt), "completion": text, "reward": float(ok),
             "solution": gold, "image": thumbnail_b64(req.images[0] if req.images else None)}
            for req, text, ok, gold in list(zip(requests, texts, correct, golds))[:SAMPLES_LOGGED]
        ]
        return metrics, samples


# ------------------------------------------------------------------ the evaluator


class OfflineEvaluator:
    """Evaluates the learners on a held-out dataset; see the module docstring.

    Args:
        dataset: held-out rows of the job's kind.
        objective: the training objective, passed to the learners (its config decides the loss).
        judge: greedy exact-match scoring, or None.
        running: the driver's copy of a preference objective whose ``after_step`` follows training,
            for the running ``bco_pair`` mean (the learners' own copies live in their processes).
        reference: ``[rows, 2]`` precomputed reference logprobs of the eval pairs, or None to ask
            the learners' reference model once (preference objectives only).
        chunk_rows: rows sent to the learners per call.
    """

    def __init__(self, dataset: VLMDataset, objective: Any, judge: GreedyJudge | None,
                 running: Any = None, reference: torch.Tensor | None = None, chunk_rows: int = 64):
        self.dataset, self.objective, self.judge = dataset, objective, judge
        self.running = running if running is not None else objective
        self.reference = reference
        self.chunk_rows = chunk_rows

    def _row_logprobs(self, learners, reference: bool = False) -> list[torch.Tensor]:
        return row_logprobs(learners, self.objective, self.dataset, self.chunk_rows, reference)

    def _reference(self, learners) -> torch.Tensor:
        """Summed reference logprobs of the eval pairs, computed once (the reference never changes)."""
        if self.reference is None:
            self.reference = pair_sums(self._row_logprobs(learners, reference=True))
        return self.reference

    def evaluate(self, learners) -> tuple[dict[str, float], list[dict[str, Any]]]:
        """Eval metrics (``eval/...``) and greedy samples for ``samples.jsonl``."""
        if isinstance(self.objective, SFTObjective):
            metrics = sft_eval_metrics(self._row_logprobs(learners), self.objective.cfg.aggregation)
        elif isinstance(self.objective, PreferenceObjective):
            reference = self._reference(learners)
            metrics = preference_eval_metrics(self._row_logprobs(learners), reference, self.running)
        else:
            raise TypeError(f"offline evaluation has no loss for {type(self.objective).__name__}")
        samples: list[dict[str, Any]] = []
        if self.judge is not None and self.judge.enabled:
            greedy, samples = self.judge.evaluate(learners)
            metrics.update(greedy)
        return metrics, samples
