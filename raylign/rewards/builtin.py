"""Built-in reward functions, with TRL's signature ``fn(prompts, completions, **columns)``.

Each returns ``list[float | None]``, one value per completion.

``completions`` are conversational (``[[{"role": "assistant", "content": text}], ...]``) when the
prompts are, else plain strings. ``None`` means "no opinion" and is left out of the weighted sum.

math-verify's own timeouts use ``signal.alarm``, which raises inside threads (threaded / async Ray
actors) and silently turns a reward into 0. We always pass ``parsing_timeout=None`` /
``timeout_seconds=None``; the hard timeout is the reward worker's process pool (see ``pool.py``).
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable, Sequence
from typing import Any

from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

RewardFn = Callable[..., list]  # fn(prompts, completions, **columns) -> list[float | None]

FORMAT_PATTERN = re.compile(r"^<think>.*?</think>\s*<answer>.*?</answer>$", re.DOTALL)
_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
# The answer may be plain ("0.5", "-3") or LaTeX ("\frac{1}{2}", "\boxed{7}"); \boxed wins when present.
_ANSWER_CONFIG = (LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig())


class _DropDisabledTimeoutWarning(logging.Filter):
    """math-verify warns once per process that its timeout is off; here that is on purpose (see above)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Timeout is disabled")


for _name in ("math_verify.parser", "math_verify.grader"):
    logging.getLogger(_name).addFilter(_DropDisabledTimeoutWarning())


def completion_text(completion: Any) -> str:
    """The text of one completion: a plain string, or the content of a conversational message list."""
    if isinstance(completion, str):
        return completion
    content = completion[-1]["content"] if completion else ""
    if isinstance(content, str):
        return content
    # Multimodal content parts: [{"type": "text", "text": ...}, ...]
    return "".join(part.get("text", "") for part in content if isinstance(part, dict))


def format_reward(completions: Sequence[Any], **kwargs: Any) -> list[float | None]:
    """1.0 when a completion is exactly ``<think>...</think> <answer>...</answer>``, else 0.0."""
    return [1.0 if FORMAT_PATTERN.match(completion_text(c)) else 0.0 for c in completions]


def extract_answer(text: str) -> str:
    """The inside of the last ``<answer>...</answer>`` block, or the whole text when there is none."""
    blocks = _ANSWER_TAG.findall(text)
    return blocks[-1] if blocks else text


def _gold(solution: Any, cache: dict[str, list]) -> list:
    key = str(solution)
    if key not in cache:
        cache[key] = parse(key, parsing_timeout=None)
    return cache[key]


def accuracy_reward(completions: Sequence[Any], solution: Sequence[Any], **kwargs: Any) -> list[float | None]:
    """1.0 when the answer math-verifies against ``solution``, 0.0 when not, None when the gold has no parse.

    The gold is parsed first (once per distinct solution in the call, as a group shares one); an
    unparseable gold gives None ("no opinion"), as TRL's recipe does. The answer is read from inside
    ``<answer>...</answer>`` when present.
    """
    if len(solution) != len(completions):
        raise ValueError(f"accuracy_reward: {len(completions)} completions but {len(solution)} solutions")
    cache: dict[str, list] = {}
    rewards: list[float | None] = []
    for completion, sol in zip(completions, solution, strict=True):
        gold = _gold(sol, cache)
        if not gold:
            rewards.append(None)
            continue
        answer = parse(
            extract_answer(completion_text(completion)),
            extraction_config=_ANSWER_CONFIG,
            parsing_timeout=None,
        )
        rewards.append(1.0 if verify(gold, answer, timeout_seconds=None) else 0.0)
    return rewards


class OverlongPenalty:
    """DAPO's soft overlong punishment (a callable class, so it pickles; closures do not).

    With ``L = max_completion_length`` and ``C = soft_cache``: 0 up to ``L - C`` tokens, then a
    linear ramp down to -1 at ``L``, and -1 beyond ``L``.

    Lengths are token counts: the reward worker passes ``completion_lengths``; TRL passes
    ``completion_ids``. Called with neither (e.g. by hand on text), it estimates tokens as
    ``len(text) / 4`` (about 4 characters per BPE token in English), which is only a rough guide.
    """

    __name__ = "overlong_penalty"

    def __init__(self, max_completion_length: int, soft_cache: int):
        if max_completion_length <= 0 or not 0 < soft_cache <= max_completion_length:
            raise ValueError(
                f"overlong penalty needs 0 < soft_cache <= max_completion_length, "
                f"got soft_cache={soft_cache}, max_completion_length={max_completion_length}"
            )
        self.max_completion_length = max_completion_length
        self.soft_cache = soft_cache

    def penalty(self, length: float) -> float:
        """The penalty for one completion of ``length`` tokens."""
        start = self.max_completion_length - self.soft_cache
        if length <= start:
            return 0.0
        if length <= self.max_completion_length:
            return (start - length) / self.soft_cache
        return -1.0

    def __call__(
        self,
        completions: Sequence[Any],
        completion_lengths: Sequence[int] | None = None,
        completion_ids: Sequence[Sequence[int]] | None = None,
        **kwargs: Any,
    ) -> list[float | None]:
        if completion_lengths is not None:
            lengths: list[float] = [float(n) for n in completion_lengths]
        elif completion_ids is not None:
            lengths = [float(len(ids)) for ids in completion_ids]
        else:
            lengths = [math.ceil(len(completion_text(c)) / 4) for c in completions]
        return [self.penalty(n) for n in lengths]


def make_overlong_penalty(max_completion_length: int, soft_cache: int) -> OverlongPenalty:
    """A reward fn applying DAPO's soft overlong punishment (see ``OverlongPenalty``)."""
    return OverlongPenalty(max_completion_length, soft_cache)


# Ready-to-use reward functions, by the name a config gives them.
BUILTIN_REWARDS: dict[str, RewardFn] = {
    "format": format_reward,
    "accuracy": accuracy_reward,
}

# Builtins that need arguments, written in a spec as ``overlong(max_completion_length=512, soft_cache=128)``.
BUILTIN_FACTORIES: dict[str, Callable[..., RewardFn]] = {
    "overlong": make_overlong_penalty,
}
