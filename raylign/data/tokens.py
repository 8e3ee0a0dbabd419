"""Tokenise one chat row through the model's processor and mark its target (completion) tokens.

The processor expands each image placeholder into the family's run of image tokens, which moves
every later character offset. Targets are therefore found on the *unexpanded* chat text, where the
tokenizer's offsets line up with the text, and carried over to the expanded ids, which differ from
the unexpanded ones only in the length of each image-token run.

A target span is an assistant turn's content plus its closing end-of-turn token (``<|im_end|>``),
found by rendering the conversation up to the turn (with the generation prompt) and through it.
This needs a template whose rendering of a prefix of the conversation is a prefix of the whole
rendering; ChatML templates (Qwen, LLaVA-on-Qwen) are.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Sequence

import torch

from raylign.data.chat import Messages, check_placeholder_counts, render_prompt
from raylign.data.errors import DataError

# Per-token processor outputs (padded with the batch); everything else is a vision tensor.
PER_TOKEN_KEYS = ("attention_mask", "mm_token_type_ids", "token_type_ids")
_VISION_MARKERS = ("<|vision_start|>", "<|vision_end|>")


@dataclass(frozen=True)
class Encoded:
    """One tokenised row, before padding."""

    input_ids: torch.Tensor  # [L] long
    per_token: dict[str, torch.Tensor]  # [L] each: attention_mask, mm_token_type_ids, ...
    targets: torch.Tensor  # [L] bool: True on completion tokens
    vision: dict[str, torch.Tensor]  # pixel_values, image_grid_thw, ... (first dim: images or patches)
    prompt_length: int  # tokens before the protected completion
    max_drop: int  # most leading tokens truncate_left may drop (before any image or the completion)
    image_tokens: int  # tokens that are image placeholders

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    def drop_left(self, n: int) -> Encoded:
        """The row with its first ``n`` tokens removed (``n <= max_drop``)."""
        if not 0 <= n <= self.max_drop:
            raise ValueError(f"can drop at most {self.max_drop} leading tokens, asked {n}")
        return replace(
            self,
            input_ids=self.input_ids[n:],
            per_token={k: v[n:] for k, v in self.per_token.items()},
            targets=self.targets[n:],
            prompt_length=self.prompt_length - n,
            max_drop=self.max_drop - n,
        )


def image_token_id(processor) -> int:
    """The id of the token each image placeholder expands into."""
    tid = getattr(processor, "image_token_id", None)
    if tid is None:
        tid = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
    return int(tid)


def vision_token_ids(processor) -> set[int]:
    """Ids that belong to an image (placeholder runs and their start/end markers)."""
    tok = processor.tokenizer
    ids = {image_token_id(processor)}
    for marker in _VISION_MARKERS:
        tid = tok.convert_tokens_to_ids(marker)
        if tid is not None and tid != tok.unk_token_id:
            ids.add(int(tid))
    return ids


def end_of_turn(processor) -> str:
    """The token closing an assistant turn, which is trained on (the model must learn to stop)."""
    return processor.tokenizer.eos_token or "<|im_end|>"


def target_spans(processor, messages: Messages, first_target: int = 0) -> tuple[str, list[tuple[int, int]]]:
    """The chat text of ``messages`` and the character spans of assistant turns from ``first_target`` on."""
    text = render_prompt(processor, messages, add_generation_prompt=False)
    eot = end_of_turn(processor)
    spans = []
    for i in range(first_target, len(messages)):
        if messages[i].get("role") != "assistant":
            continue
        before = render_prompt(processor, messages[:i], add_generation_prompt=True) if i else ""
        through = render_prompt(processor, messages[: i + 1], add_generation_prompt=False)
        if not (through.startswith(before) and text.startswith(through)):
            raise DataError(
                f"the chat template does not render message {i} as an extension of the messages before it, "
                f"so its tokens cannot be located; use a template whose renderings of a conversation's "
                f"prefixes are prefixes of the whole (ChatML does)"
            )
        end = through.rfind(eot, len(before))
        spans.append((len(before), end + len(eot) if end >= 0 else len(through.rstrip())))
    return text, spans


def process_batch(
    processor, texts: Sequence[str], images: Sequence[Sequence[Any]]
) -> list[tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, torch.Tensor]]]:
    """One processor call for all rows (its per-call overhead dominates small rows), split back per row.

    Returns ``(input_ids [L_b], per-token tensors [L_b], vision tensors)`` per row, unpadded.
    """
    check_placeholder_counts(processor, texts, images)
    kwargs: dict[str, Any] = {"images": [list(i) for i in images]} if any(len(i) for i in images) else {}
    out = dict(processor(text=list(texts), padding=True, padding_side="right", return_tensors="pt", **kwargs))
    ids = out.pop("input_ids")
    lengths = out["attention_mask"].sum(1).tolist()
    per_token = {k: v for k, v in out.items() if k in PER_TOKEN_KEYS or tuple(v.shape) == tuple(ids.shape)}
    vision = _split_vision({k: v for k, v in out.items() if k not in per_token}, [len(i) for i in images])
    return [
        (ids[b, :n], {k: v[b, :n] for k, v in per_token.items()}, vision[b]) for b, n in enumerate(lengths)
    ]


def _split_vision(vision: dict[str, torch.Tensor], counts: list[int]) -> list[dict[str, torch.Tensor]]:
    """Per-row pieces of the batch's vision tensors: their first dim is images, or (Qwen) image patches."""
    rows: list[dict[str, torch.Tensor]] = [{} for _ in counts]
    grid = vision.get("image_grid_thw")
    patches = grid.prod(-1).tolist() if grid is not None else None
    for key, value in vision.items():
        if value.shape[0] == sum(counts):
            sizes = counts
        elif patches is not None and value.shape[0] == sum(patches):
            bounds = [sum(counts[:b]) for b in range(len(counts) + 1)]
            sizes = [sum(patches[bounds[b] : bounds[b + 1]]) for b in range(len(counts))]
        else:
            raise RuntimeError(
                f"the processor's {key!r} (shape {tuple(value.shape)}) is neither per image nor per "
                f"image patch; raylign supports Qwen-VL and LLaVA processors"
            )
        for b, piece in enumerate(torch.split(value, sizes)):
            if counts[b]:
                rows[b][key] = piece
    return rows


def _align(unexpanded: list[int], expanded: list[int], image_id: int) -> list[int]:
    """Index in ``expanded`` of each non-image token of ``unexpanded`` (image runs differ in length only)."""
    where = [-1] * len(unexpanded)
    i = j = 0
    while i < len(unexpanded):
        if unexpanded[i] == image_id:
            while i < len(unexpanded) and unexpanded[i] == image_id:
                i += 1
            while j < len(expanded) and expanded[j] == image_id:
                j += 1
            continue
        if j >= len(expanded) or unexpanded[i] != expanded[j]:
            raise RuntimeError(
                "the processor's token ids differ from the tokenizer's outside the image runs; raylign "
                "supports processors that only expand image placeholders (Qwen-VL, LLaVA)"
            )
        where[i] = j
        i += 1
        j += 1
    return where


def _first(mask: torch.Tensor, default: int) -> int:
    nz = torch.nonzero(mask)
    return int(nz[0, 0]) if len(nz) else default


def encode_chats(processor, chats: Sequence[tuple[Messages, Sequence[Any], int, str]]) -> list[Encoded]:
    """Tokenise whole conversations ``(messages, images, first_target, protect)``.

    Targets are the assistant turns from message ``first_target`` on. ``protect`` says which target
    span truncate_left must keep whole: ``"last"`` (SFT: the final assistant turn) or ``"first"``
    (preference: the whole completion).
    """
    rendered = [target_spans(processor, messages, first) for messages, _, first, _ in chats]
    if any(not spans for _, spans in rendered):
        raise DataError("the conversation has no assistant turn to train on; add one (role 'assistant')")
    texts = [text for text, _ in rendered]
    processed = process_batch(processor, texts, [images for _, images, _, _ in chats])
    plain = processor.tokenizer(texts, return_offsets_mapping=True)
    image_id = image_token_id(processor)
    encoded = []
    for b, ((_, spans), (ids, per_token, vision)) in enumerate(zip(rendered, processed)):
        where = _align(plain["input_ids"][b], ids.tolist(), image_id)
        targets = torch.zeros(len(ids), dtype=torch.bool)
        starts = []
        for start, end in spans:
            inside = [
                where[k]
                for k, (a, _) in enumerate(plain["offset_mapping"][b])
                if start <= a < end and where[k] >= 0
            ]
            targets[inside] = True
            starts.append(inside[0] if inside else len(ids))
        keep = starts[-1] if chats[b][3] == "last" else starts[0]
        encoded.append(_finish(processor, ids, per_token, vision, targets, keep))
    return encoded


def encode_prompt_completions(
    processor,
    prompts: Sequence[Any],
    images: Sequence[Sequence[Any]],
    completion_ids: Sequence[Sequence[int]],
) -> list[Encoded]:
    """Each prompt (with generation prompt) expanded by the processor, then its completion ids verbatim."""
    texts = [render_prompt(processor, p, len(i), add_generation_prompt=True) for p, i in zip(prompts, images)]
    encoded = []
    for (ids, per_token, vision), completion in zip(process_batch(processor, texts, images), completion_ids):
        tail = torch.as_tensor(list(completion), dtype=torch.long)
        n, c = len(ids), len(tail)
        per_token = {
            k: torch.cat(
                [v, torch.ones(c, dtype=v.dtype) if k == "attention_mask" else torch.zeros(c, dtype=v.dtype)]
            )
            for k, v in per_token.items()
        }
        targets = torch.cat([torch.zeros(n, dtype=torch.bool), torch.ones(c, dtype=torch.bool)])
        encoded.append(_finish(processor, torch.cat([ids, tail]), per_token, vision, targets, n))
    return encoded


def _finish(processor, ids, per_token, vision, targets, completion_start: int) -> Encoded:
    is_vision = torch.isin(ids, torch.tensor(sorted(vision_token_ids(processor))))
    first_vision = _first(is_vision, len(ids))
    return Encoded(
        input_ids=ids,
        per_token=per_token,
        targets=targets,
        vision=vision,
        prompt_length=completion_start,
        max_drop=min(first_vision, completion_start),
        image_tokens=int((ids == image_token_id(processor)).sum()),
    )
