"""Chat formatting through the model's own processor and chat template.

Prompts follow TRL's dataset formats: *conversational* (a list of ``{"role", "content"}`` messages,
content either a string or a list of ``{"type": "image"}`` / ``{"type": "text", "text": ...}``
parts) or *plain text* (a string). A plain-text prompt with images becomes one user turn with the
image parts first, which is what TRL does for VLMs.

Image placeholders written in the text: many LLaVA-style datasets put ``"<image>"`` in the user turn
on purpose. raylign's rule: in a user or system turn (or a plain-text prompt), each literal
placeholder -- ``"<image>"``, Qwen's ``"<|image_pad|>"`` or its whole rendered form
``"<|vision_start|><|image_pad|><|vision_end|>"`` -- *is* an image part at that position, for every
model family, so the same rows mean the same thing for LLaVA and Qwen. Placeholders (parts and
literals together) must then equal the row's images, which validation checks with the row and
column named. An assistant turn never holds one, and Qwen's other vision tokens (video, markers on
their own) are not images: validation rejects both (``literal_problem``).
"""

from __future__ import annotations

import re
from typing import Any, Sequence

from raylign.data.errors import DataError

Messages = list[dict[str, Any]]

# Longest first, so Qwen's rendered form counts as one image, not as an image pad plus two markers.
IMAGE_PLACEHOLDERS = ("<|vision_start|><|image_pad|><|vision_end|>", "<|image_pad|>", "<image>")
OTHER_VISION_TOKENS = ("<|vision_start|>", "<|vision_end|>", "<|video_pad|>", "<|vision_pad|>")
_PLACEHOLDER = re.compile("|".join(re.escape(p) for p in IMAGE_PLACEHOLDERS))
_OTHER_VISION = re.compile("|".join(re.escape(t) for t in OTHER_VISION_TOKENS))


def is_conversational(prompt: Any) -> bool:
    """True for a list of role/content messages (TRL's conversational format)."""
    return isinstance(prompt, (list, tuple)) and bool(prompt) and isinstance(prompt[0], dict) and "role" in prompt[0]


def to_messages(prompt: Any, num_images: int = 0) -> Messages:
    """Normalise a prompt to conversational messages; plain text gets its images prepended.

    Conversational prompts are copied with ``None``-valued keys dropped from content parts (Arrow
    stores parts as structs, so a text part read back from a dataset carries ``"image": None``, which
    real Qwen templates take for an image). A conversation with no image part but ``num_images``
    images gets them at the start of its first user turn, as TRL does.
    """
    if is_conversational(prompt):
        messages = [_clean_message(m) for m in prompt]
        if num_images and count_image_parts(messages) == 0:
            _insert_image_parts(messages, num_images)
        return messages
    if not isinstance(prompt, str):
        raise TypeError(f"a prompt must be a string or a list of chat messages, got {type(prompt).__name__}")
    parts = split_placeholders(prompt)
    if not any(p["type"] == "image" for p in parts):
        parts = [{"type": "image"} for _ in range(num_images)] + parts
    return [{"role": "user", "content": parts}]


def split_placeholders(text: str) -> list[dict[str, Any]]:
    """``text`` as content parts: each literal image placeholder becomes an image part in its place."""
    parts: list[dict[str, Any]] = []
    start = 0
    for m in _PLACEHOLDER.finditer(text):
        if m.start() > start:
            parts.append({"type": "text", "text": text[start : m.start()]})
        parts.append({"type": "image"})
        start = m.end()
    if start < len(text) or not parts:
        parts.append({"type": "text", "text": text[start:]})
    return parts


def _split_part(part: Any) -> list[Any]:
    """A text part with literal placeholders as text and image parts; any other part as it is."""
    if isinstance(part, dict) and part.get("type") == "text" and _PLACEHOLDER.search(part.get("text") or ""):
        return split_placeholders(part["text"])
    return [part]


def literal_problem(messages: Messages) -> str | None:
    """What is wrong with the placeholders written in ``messages``' text, or None (see the module doc)."""
    for m in messages:
        for text in _texts(m):
            if m.get("role") == "assistant" and (found := _PLACEHOLDER.search(text)):
                return (
                    f"the assistant turn contains the image placeholder {found.group()!r}; remove it "
                    "(images belong in the prompt)"
                )
            if found := _OTHER_VISION.search(_PLACEHOLDER.sub("", text)):
                return (
                    f"the text contains the vision token {found.group()!r}, which is not an image placeholder "
                    "(raylign feeds images only); remove it"
                )
    return None


def _clean_message(message: dict[str, Any]) -> dict[str, Any]:
    """A copy without ``None``-valued part keys; outside assistant turns literal placeholders become parts."""
    out = dict(message)
    content = out.get("content")
    if isinstance(content, (list, tuple)):
        content = [
            {k: v for k, v in part.items() if v is not None} if isinstance(part, dict) else part
            for part in content
        ]
    if out.get("role") == "assistant":
        out["content"] = content
    elif isinstance(content, str):
        out["content"] = split_placeholders(content) if _PLACEHOLDER.search(content) else content
    elif content is not None:
        out["content"] = [q for part in content for q in _split_part(part)]
    return out


def _insert_image_parts(messages: Messages, num_images: int) -> None:
    user = next((m for m in messages if m.get("role") == "user"), None)
    if user is None:
        raise ValueError(f"{num_images} image(s) given but the conversation has no user turn to put them in")
    content = user.get("content")
    text = [{"type": "text", "text": content}] if isinstance(content, str) else list(content or [])
    user["content"] = [{"type": "image"} for _ in range(num_images)] + text


def count_image_parts(messages: Messages) -> int:
    """Number of image placeholders in the messages (must equal the number of images given)."""
    return sum(
        1
        for m in messages
        if not isinstance(m.get("content"), str)
        for part in m.get("content") or ()
        if isinstance(part, dict) and part.get("type") in ("image", "image_url")
    )


def count_literal_placeholders(prompt: Any) -> int:
    """Image placeholders written as text in a prompt's user/system turns (or in a plain-text prompt)."""
    if isinstance(prompt, str):
        return len(_PLACEHOLDER.findall(prompt))
    messages = prompt if is_conversational(prompt) else ()
    users = (m for m in messages if m.get("role") != "assistant")
    return sum(len(_PLACEHOLDER.findall(t)) for m in users for t in _texts(m))


def _texts(message: dict[str, Any]) -> list[str]:
    """The text of a message: its string content, or its text parts."""
    content = message.get("content")
    if isinstance(content, str):
        return [content]
    return [p.get("text") or "" for p in content or () if isinstance(p, dict) and p.get("type") == "text"]


def check_placeholder_counts(processor, texts: Sequence[str], images: Sequence[Sequence[Any]]) -> None:
    """Raise before the processor (and the model) see a text whose image placeholders miscount its images.

    Validation names the dataset row; this guard covers rows that skipped it (the processor's own
    error would come later, and from the learner mid-run).
    """
    token = getattr(processor, "image_token", None)
    for b, (text, imgs) in enumerate(zip(texts, images)):
        if token and text.count(token) != len(imgs):
            raise DataError(
                f"batch row {b}: the chat text has {text.count(token)} image placeholder(s) {token!r} but "
                f"{len(imgs)} image(s); give one placeholder per image (validate the data first: "
                "raylign.data.validate.validate_dataset names the row)"
            )


def render_prompt(processor, prompt: Any, num_images: int = 0, add_generation_prompt: bool = True) -> str:
    """The chat text of a prompt with *unexpanded* image placeholders (one per image).

    This is the form vLLM wants together with ``multi_modal_data``; the HF processor expands the
    placeholders itself when called with the images.
    """
    return processor.apply_chat_template(
        to_messages(prompt, num_images), tokenize=False, add_generation_prompt=add_generation_prompt
    )


def completion_messages(texts: Sequence[str]) -> list[Messages]:
    """Completions in TRL's conversational form, as reward functions receive them."""
    return [[{"role": "assistant", "content": t}] for t in texts]


def encode_for_generation(processor, prompts: Sequence[Any], images: Sequence[Sequence[Any]]) -> dict:
    """Tokenise a batch of prompts (with their images) for ``generate``: left-padded tensors.

    ``images[i]`` are the PIL images of prompt ``i`` in placeholder order (may be empty).
    Returns the processor's BatchFeature (input_ids, attention_mask, pixel_values, image_grid_thw, ...).
    """
    texts = [render_prompt(processor, p, len(imgs)) for p, imgs in zip(prompts, images)]
    check_placeholder_counts(processor, texts, images)
    has_images = any(len(imgs) for imgs in images)
    kwargs: dict[str, Any] = {"images": [list(imgs) for imgs in images]} if has_images else {}
    return processor(text=texts, padding=True, padding_side="left", return_tensors="pt", **kwargs)
