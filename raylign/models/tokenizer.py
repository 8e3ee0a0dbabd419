"""A byte-level BPE tokenizer trained in code, with a VLM family's special tokens and chat template.

Nothing is downloaded: the tiny models for tests and the demo need a real tokenizer (special
tokens, chat template, assistant masks) but not a good one.
"""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

# Qwen's ChatML tokens plus the vision markers of both families.
CHATML_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
QWEN_VISION_SPECIAL = ["<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]
LLAVA_VISION_SPECIAL = ["<image>"]
# Reasoning tags are single (non-special) tokens so a tiny model learns the format quickly; they
# survive decode(skip_special_tokens=True), which reward functions rely on.
REASONING_TOKENS = ["<think>", "</think>", "<answer>", "</answer>"]

# ChatML with `{% generation %}` blocks so `return_assistant_tokens_mask=True` works for SFT masks.
_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['content'] is string %}"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] + '<|im_end|>' }}"
    "{% endgeneration %}{{ '\\n' }}{% else %}{{ message['content'] + '<|im_end|>\\n' }}{% endif %}"
    "{% else %}"
    "{% if message['role'] == 'assistant' %}{% generation %}"
    "{% for part in message['content'] %}{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}"
    "{{ '<|im_end|>' }}{% endgeneration %}{{ '\\n' }}"
    "{% else %}"
    "{% for part in message['content'] %}"
    "{% if part['type'] == 'image' or part['type'] == 'image_url' %}{{ IMAGE }}"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{{ '<|im_end|>\\n' }}"
    "{% endif %}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

IMAGE_PLACEHOLDER = {
    "qwen2_5_vl": "<|vision_start|><|image_pad|><|vision_end|>",
    "llava": "<image>",
}

_CORPUS_WORDS = (
    "how many red green blue yellow shapes circles squares triangles are there in the image "
    "which is bigger left right the first second what digit is shown answer think count "
    "compare size colour color number of objects picture look carefully and reply with only "
    "I see so the is 0 1 2 3 4 5 6 7 8 9 10 11 12 yes no + - = . , : ? ! "
)


def chat_template(family: str) -> str:
    """The ChatML template with the family's image placeholder."""
    return _CHAT_TEMPLATE.replace("{{ IMAGE }}", "{{ '" + IMAGE_PLACEHOLDER[family] + "' }}")


def train_tokenizer(family: str, vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on a small built-in corpus and wrap it for transformers."""
    vision = QWEN_VISION_SPECIAL if family == "qwen2_5_vl" else LLAVA_VISION_SPECIAL
    special = CHATML_SPECIAL + vision
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    corpus = [_CORPUS_WORDS * 4, " ".join(str(i) for i in range(200)), " ".join(REASONING_TOKENS)]
    tok.train_from_iterator(corpus, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=vision,
        padding_side="right",
        model_max_length=4096,
    )
    fast.add_tokens(REASONING_TOKENS)
    fast.chat_template = chat_template(family)
    if family == "llava":
        fast.image_token = "<image>"
    return fast
