"""The lmms-eval adapter on a LLaVA-NeXT (anyres) TRIM folder: `python -m lmms_eval --model llava_trim ...` run offline
on the local task, each answer equal to the model's own answer under LLaVA's prompt of the checkpoint's conversation
(`vicuna_v1`, `mistral_instruct`), the images' sizes passed along (`image_sizes`)."""

import os

import pytest
import torch
from PIL import Image
from test_lmms_eval_model import SHORT, run_lmms_eval, task  # noqa: F401 (fixture)

if os.environ.get("LLAVA_TRIM_REQUIRE_LMMS_EVAL") != "1":
    pytest.importorskip("lmms_eval", reason="pip install 'llava-trim[lmms-eval]' to test the lmms-eval adapter")

from llava_trim.testing_utils.tiny_next import build_tiny_next_processor, tiny_next_model  # noqa: E402


def reference_answers(model_dir, docs, conversation_name: str) -> list[str]:
    """Each question alone, LLaVA's own conversation template, the model's greedy answer cut at the task's stop."""
    conversation = pytest.importorskip("llava.conversation")
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(model_dir, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(model_dir, trust_remote_code=True)
    answers = []
    for doc in docs:
        chat = conversation.conv_templates[conversation_name].copy()
        chat.append_message(chat.roles[0], ("<image>\n" if doc["image"] else "") + doc["question"] + SHORT)
        chat.append_message(chat.roles[1], None)
        images = {"images": [Image.open(doc["image"]).convert("RGB")]} if doc["image"] else {}
        inputs = processor(text=[chat.get_prompt()], return_tensors="pt", **images)
        if doc["image"]:  # LLaVA-NeXT's inputs: the image's size goes with its crops
            assert inputs["image_sizes"].tolist() == [list(Image.open(doc["image"]).size[::-1])]
        with torch.inference_mode():
            sequences = model.generate(**inputs, trim_ratio=-1, max_new_tokens=4, do_sample=False)
        text = processor.tokenizer.decode(sequences[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        answers.append(text.split("\n\n")[0].strip())
    return answers


@pytest.mark.parametrize("conversation", ["vicuna_v1", "mistral_instruct"])
def test_lmms_eval_cli_on_a_next_model_answers_as_the_model(task, tmp_path, conversation):  # noqa: F811
    task_folder, docs = task
    model_dir = tmp_path / "tiny-next"
    tiny_next_model(seed=0).save_pretrained(model_dir)
    build_tiny_next_processor(model_dir, conversation=conversation)
    expected = dict(enumerate(reference_answers(model_dir, docs, conversation)))
    assert sum(bool(answer) for answer in expected.values()) >= 3  # answers to tell apart, not empty strings

    stderr, answers = run_lmms_eval([], model_dir, task_folder, tmp_path / "one")
    assert "llava_trim: process 0 of 1 answered 6 requests" in stderr
    assert answers == expected
