"""tools/evaluate.py on a tiny LLaVA-NeXT model: answer files whose TRIM counts are the model's own selection."""

import json

import pytest
from PIL import Image
from test_evaluate import cli_args, dataset, read_jsonl  # noqa: F401  (the `dataset` fixture)

from llava_trim.testing_utils.tiny_next import build_tiny_next_processor, tiny_next_model
from llava_trim.tools.evaluate import main
from llava_trim.tools.evaluation.generation import build_prompt
from llava_trim.tools.loading import load_model_and_processor


@pytest.fixture(scope="module")
def next_model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-llava-next-trim")
    build_tiny_next_processor(folder)
    tiny_next_model(seed=0).save_pretrained(folder)
    return folder


def test_evaluate_a_next_model_records_each_images_selection(next_model_dir, dataset, tmp_path):  # noqa: F811
    root, questions = dataset
    output = tmp_path / "run"
    assert main(cli_args(next_model_dir, dataset, output, ["off", "auto", "0.1"], batch_size=3)) == 0
    model, processor = load_model_and_processor(str(next_model_dir), device="cpu")
    images = [Image.open(root / "images" / question["image"]) for question in questions]
    prompts = [build_prompt(processor, question["text"]) for question in questions]
    inputs = processor(images=images, text=prompts, padding=True, return_tensors="pt")
    summary = json.loads((output / "summary.json").read_text())
    for name, ratio in (("off", None), ("auto", -1), ("0.1", 0.1)):
        selection = model.select_image_tokens(**inputs, trim_ratio=ratio)
        answers = read_jsonl(output / f"answers_{name}.jsonl")
        assert [a["question_id"] for a in answers] == [q["question_id"] for q in questions]
        metadata = [a["metadata"] for a in answers]
        assert [m["num_kept"] for m in metadata] == selection.num_kept.tolist()
        assert [m["num_patches"] for m in metadata] == selection.candidates_per_image.tolist()
        assert [m["image_tokens"] for m in metadata] == selection.tokens_per_image.tolist()
        assert next(s for s in summary["settings"] if s["setting"] == name)["num_answered"] == len(questions)
    off = read_jsonl(output / "answers_off.jsonl")
    assert all(a["metadata"]["num_kept"] == a["metadata"]["num_patches"] for a in off)
