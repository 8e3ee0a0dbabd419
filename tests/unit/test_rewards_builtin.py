"""Built-in rewards: format regex, DAPO overlong penalty, math-verify accuracy on a 1,000-case table."""

from __future__ import annotations

import random
import time
from fractions import Fraction

import pytest

from raylign.rewards.builtin import (
    BUILTIN_FACTORIES,
    BUILTIN_REWARDS,
    accuracy_reward,
    extract_answer,
    format_reward,
    make_overlong_penalty,
)


def _conv(text: str) -> list[dict[str, str]]:
    return [{"role": "assistant", "content": text}]


@pytest.mark.parametrize(
    "text, expected",
    [
        ("<think>x</think><answer>1</answer>", 1.0),
        ("<think>\nlong\nreasoning\n</think>\n\n<answer>\n42\n</answer>", 1.0),  # DOTALL, \s* between
        ("<think>x</think><answer>1</answer>\n", 1.0),  # `$` accepts one final newline
        ("<think></think><answer></answer>", 1.0),
        ("<answer>1</answer>", 0.0),  # no think block
        ("<think>x</think>", 0.0),  # no answer
        (" <think>x</think><answer>1</answer>", 0.0),  # anchored at the start
        ("<think>x</think><answer>1</answer> trailing", 0.0),  # anchored at the end
        ("<think>x</think> so <answer>1</answer>", 0.0),  # only whitespace between the blocks
        ("<answer>1</answer><think>x</think>", 0.0),  # wrong order
        ("", 0.0),
    ],
)
def test_format_reward(text: str, expected: float) -> None:
    assert format_reward(completions=[text]) == [expected]
    assert format_reward(prompts=[[{"role": "user", "content": "q"}]], completions=[_conv(text)]) == [
        expected
    ]


def test_format_reward_multimodal_content_parts() -> None:
    parts = [
        [{"role": "assistant", "content": [{"type": "text", "text": "<think>a</think><answer>b</answer>"}]}]
    ]
    assert format_reward(completions=parts) == [1.0]


def test_overlong_penalty_values() -> None:
    fn = make_overlong_penalty(max_completion_length=100, soft_cache=20)
    lengths = [0, 50, 80, 81, 90, 95, 100, 101, 500]
    expected = [0.0, 0.0, 0.0, -0.05, -0.5, -0.75, -1.0, -1.0, -1.0]
    got = fn(completions=["x"] * len(lengths), completion_lengths=lengths)
    assert got == pytest.approx(expected, abs=1e-12)
    # TRL passes completion_ids instead; same values.
    assert fn(completions=["x"] * 3, completion_ids=[[0] * 80, [0] * 90, [0] * 120]) == pytest.approx(
        [0.0, -0.5, -1.0]
    )
    # Without token counts: ceil(len(text) / 4) tokens -> 360 chars = 90 tokens.
    assert fn(completions=["a" * 360, _conv("a" * 320)]) == pytest.approx([-0.5, 0.0])


def test_overlong_penalty_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="0 < soft_cache <= max_completion_length"):
        make_overlong_penalty(100, 200)


def test_builtin_names() -> None:
    assert BUILTIN_REWARDS == {"format": format_reward, "accuracy": accuracy_reward}
    assert set(BUILTIN_FACTORIES) == {"overlong"}


def test_extract_answer_takes_the_last_block() -> None:
    assert extract_answer("<answer>1</answer> then <answer> 2 </answer>") == " 2 "
    assert extract_answer("no tags 3") == "no tags 3"


def test_accuracy_unparseable_gold_is_no_opinion() -> None:
    out = accuracy_reward(
        completions=["<answer>1</answer>", "<answer>1</answer>"], solution=["no number here", "1"]
    )
    assert out == [None, 1.0]


def test_accuracy_length_mismatch_raises() -> None:
    with pytest.raises(ValueError, match="2 completions but 1 solutions"):
        accuracy_reward(completions=["1", "2"], solution=["1"])


# ---------------------------------------------------------------- the 1,000-case table


def _decimal(q: Fraction) -> str:
    """Exact decimal string of a fraction whose denominator divides a power of 10."""
    sign = "-" if q < 0 else ""
    q = abs(q)
    scale = 10**6
    assert (q * scale).denominator == 1
    whole, frac = divmod(int(q * scale), scale)
    return f"{sign}{whole}" + (f".{frac:06d}".rstrip("0") if frac else "")


def _latex_frac(q: Fraction) -> str:
    sign = "-" if q < 0 else ""
    return f"{sign}\\frac{{{abs(q.numerator)}}}{{{q.denominator}}}"


_WRAPS = (
    lambda a: f"<think>work it out</think><answer>{a}</answer>",
    lambda a: f"<think>first guess 12345</think>\n<answer>${a}$</answer>",
    lambda a: f"So the result is \\boxed{{{a}}}.",
    lambda a: f"<answer>\\boxed{{{a}}}</answer>",
)


def _render(q: Fraction, style: str) -> str:
    if style == "int":
        return str(q.numerator)
    if style == "decimal":
        return _decimal(q)
    if style == "latex":
        return _latex_frac(q)
    return f"{q.numerator}/{q.denominator}"  # slash


def make_accuracy_table(size: int = 1000, seed: int = 0) -> list[tuple[str, str, float | None]]:
    """(solution, completion, expected) built so the expected answer is known by exact arithmetic."""
    rng = random.Random(seed)
    table: list[tuple[str, str, float | None]] = []
    for i in range(size):
        kind = i % 10
        if kind == 9:  # gold with no parse: no opinion
            table.append((rng.choice(["n/a", "see the figure", "blue"]), "<answer>3</answer>", None))
            continue
        if kind < 4:  # integers, some negative
            gold = Fraction(rng.randint(-500, 500))
            gold_style, styles = "int", ("int", "decimal")
        else:  # fractions with finite decimals, some negative
            gold = Fraction(rng.randint(-99, 99) or 1, rng.choice([2, 4, 5, 8, 10, 20, 25, 40]))
            gold_style = rng.choice(["latex", "decimal"])
            styles = ("latex", "decimal", "slash")
        correct = i % 3 != 0
        answer = gold if correct else gold + rng.choice([1, -1, Fraction(1, 2), 3, -gold * 2 or 7])
        if answer.denominator == 1 and rng.random() < 0.5:
            style = "int"
        else:
            style = rng.choice(styles)
            if style == "decimal" and (answer * 10**6).denominator != 1:
                style = "latex"
            if style == "int" and answer.denominator != 1:
                style = "latex"
            if style == "slash" and answer < 0:
                style = "latex"  # "-3/4" reads fine, but "\frac" keeps the sign unambiguous
        completion = rng.choice(_WRAPS)(_render(answer, style))
        table.append((_render(gold, gold_style), completion, 1.0 if answer == gold else 0.0))
    return table


def test_accuracy_matches_the_reference_table() -> None:
    table = make_accuracy_table()
    assert len(table) == 1000
    counts = {v: sum(1 for *_, e in table if e == v) for v in (1.0, 0.0, None)}
    assert counts[1.0] > 500 and counts[0.0] > 250 and counts[None] == 100
    start = time.perf_counter()
    got = []
    for j in range(0, len(table), 8):  # groups of 8, conversational and plain alternately
        chunk = table[j : j + 8]
        comps = [c if (j // 8) % 2 else _conv(c) for _, c, _ in chunk]
        got += accuracy_reward(completions=comps, solution=[s for s, _, _ in chunk])
    elapsed = time.perf_counter() - start
    wrong = [(s, c, e, g) for (s, c, e), g in zip(table, got, strict=True) if e != g]
    assert wrong == []
    assert elapsed < 20.0, f"1,000 cases took {elapsed:.1f} s"


def test_accuracy_reads_the_answer_block_not_the_reasoning() -> None:
    comps = ["<think>maybe 1/2</think><answer>3</answer>", "<think>maybe 3</think><answer>0.5</answer>", ""]
    assert accuracy_reward(completions=comps, solution=["\\frac{1}{2}"] * 3) == [0.0, 1.0, 0.0]
