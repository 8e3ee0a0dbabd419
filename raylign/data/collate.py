"""Batches for the learner: SFT, preference pairs and sampled completions, right-padded.

Every batch holds ``input_ids [B, L]``, ``attention_mask [B, L]``, ``completion_mask [B, L]`` (1 where
``input_ids[b, i]`` is a target token; the model predicts token ``i`` from position ``i - 1``), any other
per-token tensor the processor returns (``mm_token_type_ids``: Qwen computes its 3-D mRoPE positions
from it, so it must reach the forward), and the family's vision tensors (``pixel_values`` and, for
Qwen, ``image_grid_thw``), images in row order. Right padding is safe for Qwen's mRoPE: positions are
computed from ``attention_mask``, so a padded row gives the same logits as the row alone.

Length limits (``max_length``, ``max_prompt_length``) follow ``truncation``: ``"error"`` raises a
DataError, ``"skip"`` drops the row (a preference pair as a whole; indices appended to ``skipped``),
``"truncate_left"`` drops leading text tokens but never an image's tokens nor the completion (when
that is not enough it raises).
"""

from __future__ import annotations

from typing import Any, Literal, Mapping, Sequence

import torch

from raylign.data.chat import is_conversational, to_messages
from raylign.data.errors import DataError
from raylign.data.images import decode_image, to_rgb
from raylign.data.tokens import Encoded, encode_chats, encode_prompt_completions, vision_token_ids

Truncation = Literal["error", "skip", "truncate_left"]
TRUNCATIONS = ("error", "skip", "truncate_left")


def row_images(row: Mapping[str, Any]) -> list:
    """The row's images as RGB PIL images (``images`` list, or a single ``image``; PIL, bytes or paths)."""
    images = row.get("images")
    if images is None:
        images = [row["image"]] if row.get("image") is not None else []
    return [to_rgb(decode_image(im)) for im in images]


def completion_messages_of(completion: Any) -> list[dict[str, Any]]:
    """A completion as assistant messages: a string, or a conversational list (one assistant turn)."""
    if isinstance(completion, str):
        return [{"role": "assistant", "content": completion}]
    if is_conversational(completion):
        return to_messages(completion)
    raise DataError(
        f"a completion must be a string or a list of assistant messages, got {type(completion).__name__}"
    )


def _limit(
    enc: Encoded, b: int, max_length: int | None, max_prompt_length: int | None, truncation: Truncation
) -> Encoded | None:
    """Apply the length limits to one row: the row (maybe shortened), or None to skip it."""
    if truncation not in TRUNCATIONS:
        raise ValueError(f"truncation={truncation!r} is not one of {', '.join(TRUNCATIONS)}")
    need, limit = 0, ""
    if max_prompt_length is not None and enc.prompt_length > max_prompt_length:
        need = enc.prompt_length - max_prompt_length
        limit = f"its prompt has {enc.prompt_length} tokens, above max_prompt_length={max_prompt_length}"
    if max_length is not None and len(enc) - need > max_length:
        need, limit = len(enc) - max_length, f"it has {len(enc)} tokens, above max_length={max_length}"
    if need == 0:
        return enc
    if truncation == "skip":
        return None
    if truncation == "truncate_left" and need <= enc.max_drop:
        return enc.drop_left(need)
    detail = f"batch row {b}: {limit} ({enc.image_tokens} of them image tokens)"
    if truncation == "truncate_left":
        raise DataError(
            f"{detail}; truncate_left may drop only the {enc.max_drop} text tokens before the first image "
            f"and the completion, {need} must go; raise the limit, lower max_pixels, or set truncation='skip'"
        )
    raise DataError(
        f"{detail}; raise the limit, lower max_pixels, or set truncation='truncate_left' or 'skip'"
    )


def pad_batch(processor, rows: Sequence[Encoded]) -> dict[str, torch.Tensor]:
    """Right-pad encoded rows into one batch dict (vision tensors concatenated in row order)."""
    if not rows:
        raise DataError(
            "no rows left to batch (all were skipped for length); raise max_length or filter the data"
        )
    pad_id = processor.tokenizer.pad_token_id
    if pad_id is None:
        raise DataError("the tokenizer has no pad token; set tokenizer.pad_token (e.g. to its eos token)")
    width = max(len(r) for r in rows)
    batch = {
        "input_ids": torch.full((len(rows), width), int(pad_id), dtype=torch.long),
        "attention_mask": torch.zeros(len(rows), width, dtype=torch.long),
        "completion_mask": torch.zeros(len(rows), width, dtype=torch.long),
    }
    for key in rows[0].per_token:
        if key != "attention_mask":
            batch[key] = torch.zeros(len(rows), width, dtype=rows[0].per_token[key].dtype)
    for b, r in enumerate(rows):
        n = len(r)
        batch["input_ids"][b, :n] = r.input_ids
        batch["attention_mask"][b, :n] = r.per_token.get("attention_mask", torch.ones(n, dtype=torch.long))
        batch["completion_mask"][b, :n] = r.targets.long()
        for key, value in r.per_token.items():
            if key != "attention_mask":
                batch[key][b, :n] = value
    for key in dict.fromkeys(k for r in rows for k in r.vision):  # first-seen order, deterministic
        batch[key] = torch.cat([r.vision[key] for r in rows if key in r.vision], dim=0)
    return batch


def collate_sft(
    processor,
    rows: Sequence[Mapping[str, Any]],
    max_length: int | None = None,
    truncation: Truncation = "error",
    skipped: list[int] | None = None,
) -> dict[str, torch.Tensor]:
    """SFT batch from rows with ``messages`` (or ``prompt`` + ``completion``) and optional ``images``.

    Targets are every assistant turn (its content and closing end-of-turn token); for
    prompt/completion rows, the completion only. ``skipped`` (when given) receives the indices of
    rows dropped under ``truncation="skip"``.
    """
    chats = []
    for row in rows:
        images = row_images(row)
        if row.get("messages") is not None:
            chats.append((to_messages(row["messages"], len(images)), images, 0, "last"))
        else:
            prompt = to_messages(row["prompt"], len(images))
            chats.append((prompt + completion_messages_of(row["completion"]), images, len(prompt), "first"))
    encoded = []
    for b, enc in enumerate(encode_chats(processor, chats)):
        kept = _limit(enc, b, max_length, None, truncation)
        if kept is None and skipped is not None:
            skipped.append(b)
        if kept is not None:
            encoded.append(kept)
    return pad_batch(processor, encoded)


def collate_preference(
    processor,
    rows: Sequence[Mapping[str, Any]],
    max_length: int | None = None,
    max_prompt_length: int | None = None,
    truncation: Truncation = "error",
    skipped: list[int] | None = None,
) -> dict[str, torch.Tensor]:
    """One batch of ``2B`` rows: ``prompt + chosen`` in rows ``[0, B)``, ``prompt + rejected`` in ``[B, 2B)``.

    ``completion_mask`` covers the completion and its closing end-of-turn token; images repeat for the
    second half. A pair with either side over a limit is skipped (or raised on) as a whole.
    """
    chats = {"chosen": [], "rejected": []}
    for row in rows:
        images = row_images(row)
        prompt = to_messages(row["prompt"], len(images))
        for column, items in chats.items():
            items.append((prompt + completion_messages_of(row[column]), images, len(prompt), "first"))
    both = encode_chats(processor, chats["chosen"] + chats["rejected"])
    chosen, rejected = [], []
    for b in range(len(rows)):
        pair = [
            _limit(enc, b, max_length, max_prompt_length, truncation)
            for enc in (both[b], both[b + len(rows)])
        ]
        if None in pair:
            if skipped is not None:
                skipped.append(b)
            continue
        chosen.append(pair[0])
        rejected.append(pair[1])
    return pad_batch(processor, chosen + rejected)


def collate_completions(
    processor,
    prompts: Sequence[Any],
    images: Sequence[Sequence[Any]],
    completion_ids: Sequence[Sequence[int]],
) -> dict[str, torch.Tensor]:
    """Batch of sampled completions (GRPO): each prompt as generated from, then its completion ids verbatim.

    ``completion_mask.sum(1)[b] == len(completion_ids[b])``: exactly the sampled tokens are targets.
    """
    if not len(prompts) == len(images) == len(completion_ids):
        raise ValueError(
            f"got {len(prompts)} prompts, {len(images)} image lists and {len(completion_ids)} completions; "
            f"pass one of each per row"
        )
    banned = vision_token_ids(processor)
    for b, ids in enumerate(completion_ids):
        found = banned.intersection(ids)
        if found:
            raise DataError(
                f"batch row {b}: the completion contains image token id(s) {sorted(found)}, which the model "
                f"would read as image slots; suppress them when sampling (rollout engines ban them)"
            )
    rgb = [[to_rgb(im) for im in imgs] for imgs in images]
    return pad_batch(processor, encode_prompt_completions(processor, prompts, rgb, completion_ids))


def pack_targets(completion_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions of each row's target tokens, packed left: ``(index [B, T] long, mask [B, T] bool)``.

    ``T`` is the most targets in any row; ``index[b, t]`` is the position in ``input_ids`` of row
    ``b``'s ``t``-th target (its logprob comes from the logits at ``index - 1``). Padding has index 0
    and mask False.
    """
    m = completion_mask.bool()
    counts = m.sum(1)
    width = int(counts.max()) if m.numel() else 0
    order = torch.argsort((~m).to(torch.int8), dim=1, stable=True)[:, :width]
    mask = torch.arange(width, device=m.device).unsqueeze(0) < counts.unsqueeze(1)
    return order.masked_fill(~mask, 0), mask
