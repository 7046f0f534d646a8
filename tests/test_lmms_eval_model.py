"""The lmms-eval adapter (`llava-trim[lmms-eval]`): registered as `llava_trim` through the `lmms_eval.models` entry
points, and `python -m lmms_eval --model llava_trim ...` run offline on a local task (`--include_path`), in one process
and in two (accelerate launch), each answer equal to the model's own answer under LLaVA's prompt."""

import glob
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

if os.environ.get("LLAVA_TRIM_REQUIRE_LMMS_EVAL") != "1":  # `make test` sets it: there, a missing lmms-eval fails
    pytest.importorskip("lmms_eval", reason="pip install 'llava-trim[lmms-eval]' to test the lmms-eval adapter")

TASK_FOLDER = Path(__file__).parent / "lmms_eval_task"
SHORT = "\nAnswer the question using a single word or phrase."


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    """The local task, its data file filled in: five pictures and one text-only question."""
    root = tmp_path_factory.mktemp("lmms-eval-task")
    docs = []
    for index, colour in enumerate([(200, 30, 30), (30, 30, 200), (30, 200, 30), (200, 200, 30), (90, 90, 90)]):
        path = root / f"picture{index}.png"
        Image.new("RGB", (80, 48 + 8 * index), colour).save(path)
        docs.append({"image": str(path), "question": f"What colour is picture {index}?", "answer": "red"})
    docs.append({"image": "", "question": "Say hi.", "answer": "hi"})
    (root / "data.jsonl").write_text("".join(json.dumps(doc) + "\n" for doc in docs))
    folder = root / "task"
    shutil.copytree(TASK_FOLDER, folder)
    config = folder / "llava_trim_shapes.yaml"
    config.write_text(config.read_text().replace("DATA_FILE", str(root / "data.jsonl")))
    return folder, docs


def reference_answers(model_dir, docs) -> list[str]:
    """Each question alone, LLaVA's own `vicuna_v1` prompt, the model's greedy answer cut at the task's stop."""
    conversation = pytest.importorskip("llava.conversation")
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(model_dir, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(model_dir, trust_remote_code=True)
    answers = []
    for doc in docs:
        chat = conversation.conv_templates["vicuna_v1"].copy()
        chat.append_message(chat.roles[0], ("<image>\n" if doc["image"] else "") + doc["question"] + SHORT)
        chat.append_message(chat.roles[1], None)
        images = {"images": [Image.open(doc["image"]).convert("RGB")]} if doc["image"] else {}
        inputs = processor(text=[chat.get_prompt()], return_tensors="pt", **images)
        with torch.inference_mode():
            sequences = model.generate(**inputs, trim_ratio=-1, max_new_tokens=4, do_sample=False)
        text = processor.tokenizer.decode(sequences[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        answers.append(text.split("\n\n")[0].strip())
    return answers


def run_lmms_eval(launcher: list[str], model_dir, task_folder, output) -> tuple[str, dict[int, str]]:
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    command = [sys.executable, "-m", *launcher, "lmms_eval", "--model", "llava_trim"]
    command += ["--model_args", f"pretrained={model_dir},trim_ratio=-1,batch_size=2"]
    command += ["--tasks", "llava_trim_shapes", "--include_path", str(task_folder)]
    command += ["--output_path", str(output), "--log_samples"]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600, cwd=output.parent)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    (samples,) = glob.glob(str(output / "**" / "*_samples_llava_trim_shapes.jsonl"), recursive=True)
    records = [json.loads(line) for line in Path(samples).read_text().splitlines()]
    return result.stderr, {record["doc_id"]: record["filtered_resps"] for record in records}


def test_entry_point_registers_llava_trim():
    from importlib.metadata import entry_points

    import lmms_eval.models

    from llava_trim.tools.lmms_eval_model import LlavaTrim

    (entry_point,) = [ep for ep in entry_points(group="lmms_eval.models") if ep.name == "llava_trim"]
    assert entry_point.load()().model_id == "llava_trim"
    assert lmms_eval.models.get_model("llava_trim") is LlavaTrim


def test_model_args_are_checked_before_loading():
    from llava_trim.tools.lmms_eval_model import LlavaTrim

    with pytest.raises(ValueError, match="Unknown model_args for llava_trim: trim_raito"):
        LlavaTrim.create_from_arg_string("pretrained=nowhere,trim_raito=0.5")
    with pytest.raises(ValueError, match="'2' is not a trim_ratio"):
        LlavaTrim.create_from_arg_string("pretrained=nowhere,trim_ratio=2")
    with pytest.raises(ValueError, match="batch_size must be at least 1"):
        LlavaTrim.create_from_arg_string("pretrained=nowhere,batch_size=0", {"batch_size": 1, "device": None})


def test_lmms_eval_cli_one_and_two_processes_answer_as_the_model(model_dir, task, tmp_path):
    task_folder, docs = task
    expected = dict(enumerate(reference_answers(model_dir, docs)))

    stderr, answers = run_lmms_eval([], model_dir, task_folder, tmp_path / "one")
    assert "llava_trim: process 0 of 1 on cpu, trim_ratio -1, batch size 2" in stderr
    assert "llava_trim: process 0 of 1 answered 6 requests" in stderr
    assert answers == expected

    accelerate = ["accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1"]
    accelerate += ["--mixed_precision", "no", "--dynamo_backend", "no", "-m"]
    stderr, answers = run_lmms_eval(accelerate, model_dir, task_folder, tmp_path / "two")
    for rank in (0, 1):  # each process one of two, answering half of the documents
        assert f"llava_trim: process {rank} of 2 on cpu" in stderr
        assert f"llava_trim: process {rank} of 2 answered 3 requests" in stderr
    assert answers == expected
