"""Chat formatting through the model's own processor and chat template.

Prompts follow TRL's dataset formats: *conversational* (a list of ``{"role", "content"}`` messages,
content either a string or a list of ``{"type": "image"}`` / ``{"type": "text", "text": ...}``
parts) or *plain text* (a string). A plain-text prompt with images becomes one user turn with the
image parts first, which is what TRL does for VLMs.
"""

from __future__ import annotations

from typing import Any, Sequence

Messages = list[dict[str, Any]]


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
    parts: list[dict[str, Any]] = [{"type": "image"} for _ in range(num_images)]
    parts.append({"type": "text", "text": prompt})
    return [{"role": "user", "content": parts}]


def _clean_message(message: dict[str, Any]) -> dict[str, Any]:
    out = dict(message)
    content = out.get("content")
    if isinstance(content, (list, tuple)):
        out["content"] = [
            {k: v for k, v in part.items() if v is not None} if isinstance(part, dict) else part
            for part in content
        ]
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
    has_images = any(len(imgs) for imgs in images)
    kwargs: dict[str, Any] = {"images": [list(imgs) for imgs in images]} if has_images else {}
    return processor(text=texts, padding=True, padding_side="left", return_tensors="pt", **kwargs)
