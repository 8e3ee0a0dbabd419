"""In-memory training rows from the synthetic tasks, shared by the learner tests.

Importable as ``rows`` because pytest puts this folder (the root conftest's) on ``sys.path``.
"""

from __future__ import annotations

from typing import Callable

from raylign.data.synthetic import Example, format_answer, generate_example


def user_turn(question: str) -> dict:
    return {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}


def sft_rows(n: int) -> list[dict]:
    """``n`` colour-task conversations (question + image, assistant answer in the think/answer format)."""
    out = []
    for i in range(n):
        ex = generate_example("color", i)
        answer = {"role": "assistant", "content": [{"type": "text", "text": format_answer(ex.reasoning, ex.answer)}]}
        out.append({"messages": [user_turn(ex.question), answer], "images": [ex.image]})
    return out


def preference_rows(n: int, rejected_think: Callable[[int, Example], str]) -> list[dict]:
    """``n`` count-task pairs: chosen right; rejected wrong with the ``<think>`` text ``rejected_think(i, ex)``."""
    out = []
    for i in range(n):
        ex = generate_example("count", i)
        out.append(
            {
                "prompt": [user_turn(ex.question)],
                "chosen": [{"role": "assistant", "content": format_answer(ex.reasoning, ex.answer)}],
                "rejected": [{"role": "assistant", "content": format_answer(rejected_think(i, ex), ex.wrong)}],
                "images": [ex.image],
            }
        )
    return out
