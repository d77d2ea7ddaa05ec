"""Chat templates: exact prompt strings, as InternVL's conversation.py + chat() build them."""

import pytest

from internvl_aot.runtime.templates import (
    INTERNVL2_5_SYSTEM_MESSAGE,
    INTERNVL2_SYSTEM_MESSAGE,
    TEMPLATES,
    build_prompt,
    image_tokens,
    stop_strings,
)

SYS2 = "你是由上海人工智能实验室联合商汤科技开发的书生多模态大模型，英文名叫InternVL, 是一个有用无害的人工智能助手。"
SYS25 = "你是书生·万象，英文名是InternVL，是由上海人工智能实验室、清华大学及多家合作单位联合开发的多模态大语言模型。"


def img(tiles, n):
    return "<img>" + "<IMG_CONTEXT>" * (tiles * n) + "</img>"


def test_default_system_messages():
    assert INTERNVL2_SYSTEM_MESSAGE == SYS2
    assert INTERNVL2_5_SYSTEM_MESSAGE == SYS25
    for name in ("internlm2-chat", "Hermes-2", "phi3-chat"):
        assert TEMPLATES[name].system_message == SYS2
    assert TEMPLATES["internvl2_5"].system_message == SYS25


def test_internlm2_chat_single_image_two_tiles():
    # one image, no placeholder: "<image>\n" goes before the question; MPT style, no newline between turns
    got = build_prompt("internlm2-chat", "What is in the image?", [2], num_image_token=4)
    assert got == (
        f"<|im_start|>system\n{SYS2}<|im_end|>"
        f"<|im_start|>user\n{img(2, 4)}\nWhat is in the image?<|im_end|>"
        "<|im_start|>assistant\n"
    )


def test_default_num_image_token_is_256():
    got = build_prompt("internlm2-chat", "q", [2])
    assert got.count("<IMG_CONTEXT>") == 512
    assert got.count("<img>") == 1 and got.count("</img>") == 1
    assert image_tokens(3) == img(3, 256)


def test_hermes2_text_only():
    got = build_prompt("Hermes-2", "Hello!")
    assert got == f"<|im_start|>system\n{SYS2}<|im_end|><|im_start|>user\nHello!<|im_end|><|im_start|>assistant\n"


def test_phi3_custom_system():
    got = build_prompt("phi3-chat", "Describe it.", [1], num_image_token=2, system="Be brief.")
    assert got == (
        "<|system|>\nBe brief.<|end|>"
        f"<|user|>\n{img(1, 2)}\nDescribe it.<|end|>"
        "<|assistant|>\n"
    )


def test_empty_system_is_kept_as_in_conversation_py():
    got = build_prompt("internlm2-chat", "hi", system="")
    assert got == "<|im_start|>system\n<|im_end|><|im_start|>user\nhi<|im_end|><|im_start|>assistant\n"


def test_internvl2_5_multi_image_prefix():
    # several images, no placeholder: Image-1: <image>\nImage-2: <image>\n before the question
    got = build_prompt("internvl2_5", "Compare them.", [2, 1], num_image_token=3)
    assert got == (
        f"<|im_start|>system\n{SYS25}<|im_end|>\n"
        f"<|im_start|>user\nImage-1: {img(2, 3)}\nImage-2: {img(1, 3)}\nCompare them.<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_explicit_placeholders_fill_in_order():
    q = "First <image> then <image>: same?"
    got = build_prompt("internvl2_5", q, [1, 3], num_image_token=1)
    assert f"First {img(1, 1)} then {img(3, 1)}: same?" in got
    with pytest.raises(ValueError):
        build_prompt("internvl2_5", "only one <image>", [1, 1])


def test_history_internlm2_and_internvl2_5():
    history = [("<image>\nWhat is it?", "A cat."), ("Color?", "Black.")]
    got = build_prompt("internlm2-chat", "Its name?", [1], num_image_token=2, history=history)
    assert got == (
        f"<|im_start|>system\n{SYS2}<|im_end|>"
        f"<|im_start|>user\n{img(1, 2)}\nWhat is it?<|im_end|>"
        "<|im_start|>assistant\nA cat.<|im_end|>"
        "<|im_start|>user\nColor?<|im_end|>"
        "<|im_start|>assistant\nBlack.<|im_end|>"
        "<|im_start|>user\nIts name?<|im_end|>"
        "<|im_start|>assistant\n"
    )
    got = build_prompt("internvl2_5", "And now?", history=[("Hi", "Hello.")], system="S")
    assert got == (
        "<|im_start|>system\nS<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\nHello.<|im_end|>\n"
        "<|im_start|>user\nAnd now?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_text_only_keeps_literal_placeholder():
    # chat() without pixel_values leaves the question untouched
    got = build_prompt("internlm2-chat", "what does <image> mean?")
    assert "what does <image> mean?" in got


def test_stop_strings():
    assert stop_strings("internlm2-chat") == ["<|im_end|>"]
    assert stop_strings("Hermes-2") == ["<|im_end|>"]
    assert stop_strings("internvl2_5") == ["<|im_end|>"]
    assert stop_strings("phi3-chat") == ["<|end|>"]
    with pytest.raises(KeyError, match="known"):
        stop_strings("nope")
