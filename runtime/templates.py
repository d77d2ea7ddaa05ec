"""Chat templates of InternVL, as ``internvl_chat/internvl/conversation.py`` and the model's ``chat()`` build them.

All four templates InternVL2/2.5 use are of the MPT separator style:

    system_template.format(system_message) + sep  +  (role + message + sep) per finished turn  +  assistant role

so ``internlm2-chat`` has no newline between turns (``...<|im_end|><|im_start|>user\\n...``) while
``internvl2_5``'s separator carries one (``<|im_end|>\\n``).

Images: each ``<image>`` placeholder becomes ``<img>`` + ``<IMG_CONTEXT>`` x (num_image_token * tiles) +
``</img>``, replaced in order over the whole prompt (as ``chat()`` does with ``query.replace('<image>', ..., 1)``).
With images and no placeholder, ``<image>\\n`` (one image) or ``Image-1: <image>\\nImage-2: <image>\\n...``
(several) is put before the question.
"""

from __future__ import annotations

from dataclasses import dataclass

IMAGE_PLACEHOLDER = "<image>"
IMG_START_TOKEN = "<img>"
IMG_END_TOKEN = "</img>"
IMG_CONTEXT_TOKEN = "<IMG_CONTEXT>"

# InternVL2's default system message (internlm2-chat, Hermes-2 and phi3-chat all carry it in conversation.py)
INTERNVL2_SYSTEM_MESSAGE = "你是由上海人工智能实验室联合商汤科技开发的书生多模态大模型，英文名叫InternVL, 是一个有用无害的人工智能助手。"
INTERNVL2_5_SYSTEM_MESSAGE = "你是书生·万象，英文名是InternVL，是由上海人工智能实验室、清华大学及多家合作单位联合开发的多模态大语言模型。"


@dataclass(frozen=True)
class ChatTemplate:
    name: str
    system_template: str
    system_message: str
    roles: tuple[str, str]  # (user, assistant)
    sep: str

    @property
    def stop_strings(self) -> list[str]:
        """What ends the assistant's turn: the separator, stripped (InternVL's chat() uses its token id as EOS)."""
        return [self.sep.strip()]

    def render(self, messages: list[tuple[str, str | None]], system: str | None = None) -> str:
        """MPT style: a falsy message (None or "") writes the role alone, the generation prompt."""
        system_message = self.system_message if system is None else system
        ret = self.system_template.format(system_message=system_message) + self.sep
        for role, message in messages:
            if message:
                ret += role + message + self.sep
            else:
                ret += role
        return ret


TEMPLATES: dict[str, ChatTemplate] = {
    t.name: t
    for t in (
        ChatTemplate(
            name="internlm2-chat",
            system_template="<|im_start|>system\n{system_message}",
            system_message=INTERNVL2_SYSTEM_MESSAGE,
            roles=("<|im_start|>user\n", "<|im_start|>assistant\n"),
            sep="<|im_end|>",
        ),
        ChatTemplate(
            name="Hermes-2",
            system_template="<|im_start|>system\n{system_message}",
            system_message=INTERNVL2_SYSTEM_MESSAGE,
            roles=("<|im_start|>user\n", "<|im_start|>assistant\n"),
            sep="<|im_end|>",
        ),
        ChatTemplate(
            name="phi3-chat",
            system_template="<|system|>\n{system_message}",
            system_message=INTERNVL2_SYSTEM_MESSAGE,
            roles=("<|user|>\n", "<|assistant|>\n"),
            sep="<|end|>",
        ),
        ChatTemplate(
            name="internvl2_5",
            system_template="<|im_start|>system\n{system_message}",
            system_message=INTERNVL2_5_SYSTEM_MESSAGE,
            roles=("<|im_start|>user\n", "<|im_start|>assistant\n"),
            sep="<|im_end|>\n",
        ),
    )
}


def get_template(name: str) -> ChatTemplate:
    try:
        return TEMPLATES[name]
    except KeyError:
        raise KeyError(f"unknown chat template {name!r}; known: {sorted(TEMPLATES)}") from None


def stop_strings(template_name: str) -> list[str]:
    return get_template(template_name).stop_strings


def image_tokens(num_tiles: int, num_image_token: int = 256) -> str:
    """The text one image becomes: <img>, one <IMG_CONTEXT> per vision token of every tile, </img>."""
    return IMG_START_TOKEN + IMG_CONTEXT_TOKEN * (num_image_token * num_tiles) + IMG_END_TOKEN


def add_image_placeholders(question: str, num_images: int) -> str:
    """`<image>\\n` + question for one image, `Image-1: <image>\\nImage-2: <image>\\n` + question for several."""
    if num_images == 0:
        return question
    if num_images == 1:
        return IMAGE_PLACEHOLDER + "\n" + question
    return "".join(f"Image-{i}: {IMAGE_PLACEHOLDER}\n" for i in range(1, num_images + 1)) + question


def build_prompt(
    template_name: str,
    question: str,
    num_tiles_per_image: list[int] | tuple[int, ...] = (),
    num_image_token: int = 256,
    system: str | None = None,
    history: list[tuple[str, str]] | tuple = (),
) -> str:
    """The prompt text for `question` after `history` (pairs of (user, assistant)), images expanded.

    `num_tiles_per_image[i]` is the number of 448x448 tiles of image i (thumbnail included); images fill the
    `<image>` placeholders of the history and the question in order. `system=None` uses the template's default
    system message. Raises ValueError when images are given and the placeholder count does not match.
    """
    template = get_template(template_name)
    num_images = len(num_tiles_per_image)
    placeholders = question.count(IMAGE_PLACEHOLDER) + sum(q.count(IMAGE_PLACEHOLDER) for q, _ in history)
    if num_images and placeholders == 0:
        question = add_image_placeholders(question, num_images)
    messages: list[tuple[str, str | None]] = []
    for old_question, old_answer in history:
        messages.append((template.roles[0], old_question))
        messages.append((template.roles[1], old_answer))
    messages.append((template.roles[0], question))
    messages.append((template.roles[1], None))
    prompt = template.render(messages, system=system)
    if num_images:
        found = prompt.count(IMAGE_PLACEHOLDER)
        if found != num_images:
            raise ValueError(f"{num_images} image(s) given but the prompt has {found} {IMAGE_PLACEHOLDER} placeholder(s)")
        for tiles in num_tiles_per_image:
            if tiles < 1:
                raise ValueError(f"an image needs at least one tile, got {tiles}")
            prompt = prompt.replace(IMAGE_PLACEHOLDER, image_tokens(tiles, num_image_token), 1)
    return prompt
