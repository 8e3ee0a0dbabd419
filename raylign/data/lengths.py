"""Token lengths of rows without running the image processor on their pixels.

A row's length is its chat text's token count with each image placeholder replaced by the number of
tokens its (fitted) image expands to. That number comes from the processor's own
``_get_num_multimodal_tokens`` where it works, else from processing one blank image of that size
(cached per size).
"""

from __future__ import annotations

from typing import Any

from PIL import Image

from raylign.data.chat import render_prompt, to_messages
from raylign.data.images import fitted_size
from raylign.data.tokens import image_token_id, vision_token_ids

_TOO_LONG_FIX = "shorten it, lower max_pixels, raise the limit, or set truncation='truncate_left'"


class LengthCounter:
    """Counts the tokens a row will have after the processor expands its images."""

    def __init__(self, processor, min_pixels: int | None = None, max_pixels: int | None = None):
        self.processor = processor
        self.min_pixels, self.max_pixels = min_pixels, max_pixels
        self.image_id = image_token_id(processor)
        self.vision_ids = vision_token_ids(processor)
        self._per_size: dict[tuple[int, int], int] = {}

    def image_tokens(self, width: int, height: int) -> int:
        """Tokens one image of this (original) size becomes, after fitting into min/max pixels."""
        w, h = fitted_size(width, height, self.min_pixels, self.max_pixels)
        if (w, h) not in self._per_size:
            self._per_size[(w, h)] = self._from_processor(w, h)
        return self._per_size[(w, h)]

    def _from_processor(self, w: int, h: int) -> int:
        try:
            return int(self.processor._get_num_multimodal_tokens(image_sizes=[(h, w)]).num_image_tokens[0])
        except (AttributeError, TypeError, KeyError, NotImplementedError):
            # Some processors (LLaVA with a SigLIP image processor) cannot answer from sizes: measure instead.
            text = render_prompt(self.processor, "", 1)
            out = self.processor(text=[text], images=[[Image.new("RGB", (w, h))]], return_tensors="pt")
            return int((out["input_ids"][0] == self.image_id).sum())

    def measure(self, text: str, sizes: list[tuple[int, int]]) -> tuple[int, int]:
        """``(length, first_vision)``: expanded token count of ``text``, position of its first image token."""
        ids = self.processor.tokenizer(text)["input_ids"]
        placeholders = sum(1 for t in ids if t == self.image_id)
        expanded = len(ids) - placeholders + sum(self.image_tokens(w, h) for w, h in sizes)
        first_vision = next((k for k, t in enumerate(ids) if t in self.vision_ids), len(ids))
        return expanded, first_vision

    def check(
        self,
        kind: str,
        row: dict[str, Any],
        sizes: list[tuple[int, int]],
        max_length: int | None,
        max_prompt_length: int | None,
        truncation: str,
    ) -> tuple[str, str, str] | None:
        """``(column, problem, fix)`` when the row exceeds a limit (after what truncation may drop)."""
        n = len(sizes)
        if kind == "sft" and row.get("messages") is not None:
            messages = to_messages(row["messages"], n)
            last = max(i for i, m in enumerate(messages) if m.get("role") == "assistant")
            prompt_text = render_prompt(self.processor, messages[:last], n, add_generation_prompt=True)
            fulls = {"messages": render_prompt(self.processor, messages, n, add_generation_prompt=False)}
            prompt_column = "messages"
        else:
            prompt = to_messages(row["prompt"], n)
            prompt_text = render_prompt(self.processor, prompt, n, add_generation_prompt=True)
            columns = {"sft": ("completion",), "prompt": (), "preference": ("chosen", "rejected")}[kind]
            fulls = {
                c: render_prompt(self.processor, prompt + _as_messages(row[c]), n, False) for c in columns
            }
            prompt_column = "prompt"
        prompt_len, first_vision = self.measure(prompt_text, sizes)
        droppable = min(first_vision, prompt_len) if truncation == "truncate_left" else 0
        if max_prompt_length is not None and kind != "sft" and prompt_len - droppable > max_prompt_length:
            return (
                prompt_column,
                self._detail("the prompt", prompt_len, droppable, "max_prompt_length", max_prompt_length),
                _TOO_LONG_FIX,
            )
        if max_length is None:
            return None
        texts = fulls or {prompt_column: prompt_text}
        for column, text in texts.items():
            length, _ = self.measure(text, sizes)
            if length - droppable > max_length:
                return (
                    column,
                    self._detail("the row", length, droppable, "max_length", max_length),
                    _TOO_LONG_FIX,
                )
        return None

    @staticmethod
    def _detail(what: str, length: int, droppable: int, name: str, limit: int) -> str:
        kept = (
            f" ({length - droppable} after truncate_left drops the {droppable} text tokens it may)"
            if droppable
            else ""
        )
        return f"{what} has {length} tokens{kept}, above {name}={limit}"


def _as_messages(completion: Any) -> list[dict[str, Any]]:
    if isinstance(completion, str):
        return [{"role": "assistant", "content": completion}]
    return to_messages(completion)
