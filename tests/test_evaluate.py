"""Tests of `llava_trim.tools.evaluate`: metrics on hand-checked cases, LLaVA answer files, resuming."""

import json
import re
import shutil
import struct
import zlib

import pytest
from PIL import Image, ImageDraw

import llava_trim.processing_llava_trim as processing
import llava_trim.tools.evaluate as evaluate_module
from llava_trim.tools.evaluate import main
from llava_trim.tools.evaluation.answers import AnswerFile, Setting, new_answer_id
from llava_trim.tools.evaluation.generation import build_prompt
from llava_trim.tools.evaluation.questions import load_ground_truth, load_questions
from llava_trim.tools.evaluation.scoring import summarize_setting, vqa_accuracy
from llava_trim.tools.evaluation.tasks import normalize_vqa_answer as normalize_answer
from llava_trim.tools.evaluation.tasks import pope_answer as parse_yes_no
from llava_trim.tools.evaluation.tasks import pope_metrics as yes_no_metrics
from llava_trim.tools.loading import load_model_and_processor

ANSWER_KEYS = ["question_id", "prompt", "text", "answer_id", "model_id", "metadata"]  # LLaVA's order
SHORT = "\nAnswer the question using a single word or phrase."

# ---------------------------------------------------------------------------------------------------------------------
# Metrics, hand-checked
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("The Two dogs.", "2 dogs"),
        ("Yes.", "yes"),
        ("  A RED   apple! ", "red apple"),
        ("an apple, a pear", "apple pear"),
        ("1,000 people", "1000 people"),
        ("3.5 meters.", "3.5 meters"),
        ("It's Ten o'clock", "it 's 10 o'clock"),  # the EvalAI rule keeps "'s" apart and restores contractions
        ("Its ten oclock", "its 10 o'clock"),
        ("red-white", "red white"),
        ("zero", "0"),
        ("theater", "theater"),  # articles only as whole words
    ],
)
def test_normalize_answer(text, expected):
    assert normalize_answer(text) == expected


def test_vqa_accuracy_single_answer():
    assert vqa_accuracy("Two.", "2") == 1.0
    assert vqa_accuracy("The cat", "cat") == 1.0
    assert vqa_accuracy("cats", "cat") == 0.0


def test_vqa_accuracy_ten_annotators():
    # each leave-one-out subset scores min(1, matches / 3); the score is their mean
    three = ["two"] * 3 + ["three"] * 7  # matching left out: 2/3 (x3); other left out: 1 (x7) -> 0.9
    assert vqa_accuracy("2", three) == pytest.approx(0.9)
    two = ["2", "2"] + ["1"] * 8  # (2 * 1/3 + 8 * 2/3) / 10 = 0.6
    assert vqa_accuracy("Two", two) == pytest.approx(0.6)
    assert vqa_accuracy("2", ["2"] * 4 + ["1"] * 6) == 1.0
    assert vqa_accuracy("5", two) == 0.0
    assert vqa_accuracy("2", ["2"]) == 1.0


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Yes", "yes"),
        ("Yes, there is a dog in the image.", "yes"),
        ("No.", "no"),
        ("NO", "yes"),  # LLaVA's POPE scorer matches "No", "no" and "not" case-sensitively
        ("no!", "yes"),
        ("There is not a dog. No doubt about the cat.", "no"),
        ("The image shows a cat. There is no dog.", "yes"),  # only the first sentence counts, as LLaVA's scorer
        ("I think so", "yes"),
    ],
)
def test_parse_yes_no(text, expected):
    assert parse_yes_no(text) == expected


def test_yes_no_metrics_hand_checked():
    predictions = ["Yes", "Yes.", "No", "no, it is not", "yes"]
    labels = ["yes", "no", "no", "yes", "Yes"]
    metrics = yes_no_metrics(predictions, labels)  # TP 2 (0, 4), FP 1 (1), TN 1 (2), FN 1 (3)
    assert (metrics["tp"], metrics["fp"], metrics["tn"], metrics["fn"]) == (2, 1, 1, 1)
    assert metrics["accuracy"] == pytest.approx(3 / 5)
    assert metrics["precision"] == pytest.approx(2 / 3)
    assert metrics["recall"] == pytest.approx(2 / 3)
    assert metrics["f1"] == pytest.approx(2 / 3)
    assert metrics["yes_ratio"] == pytest.approx(3 / 5)
    none_yes = yes_no_metrics(["no", "no"], ["yes", "no"])
    assert none_yes["precision"] == 0.0 and none_yes["f1"] == 0.0 and none_yes["accuracy"] == 0.5


def test_parse_setting():
    assert Setting.from_text("off") == Setting("off", None)
    assert Setting.from_text("AUTO") == Setting("auto", -1)
    assert Setting.from_text("0.10") == Setting("0.1", 0.1)
    assert Setting.from_text("1") == Setting("1", 1.0)
    for bad in ("0", "1.5", "-0.2", "half"):
        with pytest.raises(ValueError, match="'auto' \\(or -1\\), 'off' \\(or none\\) or a keep ratio"):
            Setting.from_text(bad)


def test_answer_ids_look_like_shortuuid():
    ids = {new_answer_id() for _ in range(500)}
    assert len(ids) == 500
    assert all(len(answer_id) == 22 and answer_id.isalnum() and not set(answer_id) & set("01IOl") for answer_id in ids)


def record(question_id, prompt, text, **metadata):
    return {
        "question_id": question_id,
        "prompt": prompt,
        "text": text,
        "answer_id": new_answer_id(),
        "model_id": "tiny",
        "metadata": {"setting": "auto", **metadata},
    }


def test_summarize_setting_hand_checked():
    questions = [
        {"question_id": 1, "image": "a.png", "text": "Is there a dog?", "category": "random"},
        {"question_id": 2, "image": "a.png", "text": "Is there a cat?", "category": "random"},
        {"question_id": 3, "image": "b.png", "text": "Is there a cow?", "category": "popular"},
        {"question_id": 4, "image": "b.png", "text": "How many cows?"},
        {"question_id": 5, "image": "c.png", "text": "What colour?"},
        {"question_id": 6, "image": "c.png", "text": "Unanswered"},
    ]
    truths = ["yes", "no", "no", ["two"] * 3 + ["three"] * 7, None, "x"]
    timing = {"batch_size": 2, "batch_seconds": 1.0, "ttft_seconds": 0.25, "num_patches": 576}
    records = [
        record(1, "Is there a dog?", "Yes, there is.", num_kept=100, image_tokens=101, num_new_tokens=4, **timing),
        record(2, "Is there a cat?", "Yes", num_kept=50, image_tokens=51, num_new_tokens=2, **timing),
        record(3, "Is there a cow?", "No", num_kept=30, image_tokens=31, num_new_tokens=2, **timing),
        record(4, "How many cows?", "2", num_kept=20, image_tokens=21, num_new_tokens=2, **timing),
        record(5, "What colour?", "red", num_kept=0, image_tokens=1, num_new_tokens=2, **timing),
        record(99, "not a question of this file", "ignored", num_kept=576, image_tokens=577, num_new_tokens=9),
    ]
    summary = summarize_setting(Setting("auto", -1), questions, records, truths)
    assert summary["num_questions"] == 6 and summary["num_answered"] == 5
    # exact match: q1 "yes, there is" != "yes" (0), q2 0, q3 1, q4 0.9; q5 has no ground truth
    assert summary["num_scored"] == 4
    assert summary["accuracy"] == pytest.approx((0 + 0 + 1 + 0.9) / 4)
    assert summary["accuracy_by_category"] == {"popular": 1.0, "random": 0.0}
    yes_no = summary["yes_no"]  # q1 TP, q2 FP, q3 TN
    assert (yes_no["tp"], yes_no["fp"], yes_no["tn"], yes_no["fn"]) == (1, 1, 1, 0)
    assert yes_no["accuracy"] == pytest.approx(2 / 3) and yes_no["f1"] == pytest.approx(2 / 3)
    assert summary["yes_no_by_category"]["random"]["accuracy"] == 0.5
    kept = summary["kept_tokens"]
    assert kept["mean"] == pytest.approx(40.0) and kept["min"] == 0 and kept["max"] == 100 and kept["median"] == 30
    assert sum(kept["histogram"]["counts"]) == 5 and kept["histogram"]["bin_edges"][-1] == 576
    assert summary["image_tokens_mean"] == pytest.approx(41.0)
    timing_summary = summary["timing"]
    assert timing_summary["seconds_per_question"] == pytest.approx(0.5)
    assert timing_summary["questions_per_second"] == pytest.approx(2.0)
    assert timing_summary["new_tokens_per_second"] == pytest.approx(12 / 2.5)
    assert timing_summary["ttft_mean_s"] == pytest.approx(0.25)


# ---------------------------------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------------------------------


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def test_load_questions_checks_fields(tmp_path):
    good = write_jsonl(tmp_path / "q.jsonl", [{"question_id": 1, "image": "a.png", "text": "Hi?"}])
    assert load_questions(good)[0]["text"] == "Hi?"
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"question_id": 1, "text": "Hi?"}])
    with pytest.raises(ValueError, match="question 1 lacks image"):
        load_questions(bad)
    (tmp_path / "broken.jsonl").write_text('{"question_id": 1,\n')
    with pytest.raises(ValueError, match="line 1: not valid JSON"):
        load_questions(tmp_path / "broken.jsonl")


def test_ground_truth_from_pope_textvqa_and_gqa_style_files(tmp_path):
    questions = [
        {
            "question_id": 10,
            "image": "COCO_1.jpg",
            "text": "Is there a dog in the image?" + SHORT,
            "category": "random",
        },
        {"question_id": 11, "image": "COCO_2.jpg", "text": "Is there a dog in the image?" + SHORT},
        {"question_id": "abc", "image": "train/abc.jpg", "text": "what brand is it?\nReference OCR token: x" + SHORT},
        {"question_id": 20, "image": "n1.jpg", "text": "Is the sky dark?" + SHORT},
        {"question_id": 30, "image": "x.jpg", "text": "Inline?", "answer": "inline"},
        {"question_id": 40, "image": "y.jpg", "text": "By id?"},
        {"question_id": 50, "image": "y.jpg", "text": "Unknown?"},
    ]
    # POPE: different question ids, matched by image and question text
    pope = write_jsonl(
        tmp_path / "coco_pope_random.json",
        [
            {"question_id": 1, "image": "COCO_1.jpg", "text": "Is there a dog in the image?", "label": "yes"},
            {"question_id": 2, "image": "COCO_2.jpg", "text": "Is there a dog in the image?", "label": "no"},
        ],
    )
    textvqa = tmp_path / "TextVQA_0.5.1_val.json"
    textvqa.write_text(
        json.dumps({"data": [{"image_id": "abc", "question": "What brand is it?", "answers": ["x"] * 10}]})
    )
    gqa = tmp_path / "testdev_balanced_questions.json"
    gqa.write_text(json.dumps({"20": {"imageId": "n1", "question": "Is the sky dark?", "answer": "no"}}))
    vqav2 = tmp_path / "vqav2.json"  # no question text in the record: matched by question id
    vqav2.write_text(json.dumps({"annotations": [{"question_id": 40, "image_id": 7, "answers": [{"answer": "z"}]}]}))

    truths = load_ground_truth([pope, textvqa, gqa, vqav2], questions)
    assert truths == ["yes", "no", ["x"] * 10, "no", "inline", ["z"], None]


def test_answer_file_repairs_an_interrupted_line_and_counts_repeats(tmp_path):
    path = tmp_path / "answers.jsonl"
    first, second = record(1, "q", "a"), record(1, "q", "b")  # the same question asked twice
    path.write_text(json.dumps(first) + "\n" + json.dumps(second) + "\n" + '{"question_id": 2, "pro')
    answers = AnswerFile(path)
    assert [r["text"] for r in answers.records] == ["a", "b"]
    assert path.read_text().endswith("}\n")  # the cut line is gone
    questions = [{"question_id": 1, "text": "q"}] * 3 + [
        {"question_id": 2, "text": "q"},
        {"question_id": 1, "text": "r"},
    ]
    assert answers.pending(questions) == questions[2:]
    answers.write(record(2, "q", "c"))
    answers.close()
    assert [json.loads(line)["text"] for line in path.read_text().splitlines()] == ["a", "b", "c"]

    path.write_text(json.dumps(first) + "\nnot json\n" + json.dumps(second) + "\n")
    with pytest.raises(ValueError, match="line 2 is not valid JSON"):
        AnswerFile(path)


# ---------------------------------------------------------------------------------------------------------------------
# End to end on a drawn mini dataset with a tiny model
# ---------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """Three drawn pictures (not square) and five questions: colours, POPE-style yes/no, a count with 10 answers."""
    root = tmp_path_factory.mktemp("shapes")
    (root / "images" / "val").mkdir(parents=True)
    shapes = {
        "red_circle.png": ((300, 200), "ellipse", (220, 40, 40)),
        "blue_square.png": ((200, 300), "rectangle", (40, 60, 220)),
        "green_triangle.png": ((256, 256), "polygon", (40, 180, 60)),
    }
    for name, (size, shape, colour) in shapes.items():
        image = Image.new("RGB", size, (245, 245, 245))
        draw = ImageDraw.Draw(image)
        if shape == "polygon":
            draw.polygon([(128, 30), (30, 220), (226, 220)], fill=colour)
        else:
            getattr(draw, shape)((40, 40, size[0] - 40, size[1] - 40), fill=colour)
        image.save(root / "images" / "val" / name)
    questions = [
        {
            "question_id": 0,
            "image": "val/red_circle.png",
            "text": "What colour is the shape?" + SHORT,
            "answer": "Red",
        },
        {
            "question_id": 1,
            "image": "val/red_circle.png",
            "text": "Is there a circle in the image?" + SHORT,
            "answer": "yes",
            "category": "random",
        },
        {
            "question_id": 2,
            "image": "val/blue_square.png",
            "text": "Is there a circle in the image?" + SHORT,
            "answer": "no",
            "category": "adversarial",
        },
        {
            "question_id": "tri-3",
            "image": "val/green_triangle.png",
            "text": "How many triangles are there?" + SHORT,
            "answers": ["one"] * 6 + ["1"] * 3 + ["2"],
        },
        {"question_id": 4, "image": "val/blue_square.png", "text": "Describe the picture."},
    ]
    write_jsonl(root / "questions.jsonl", questions)
    return root, questions


def cli_args(model_dir, dataset, output_dir, settings, batch_size=2):
    root, _ = dataset
    return [
        "--model",
        str(model_dir),
        "--questions",
        str(root / "questions.jsonl"),
        "--image-folder",
        str(root / "images"),
        "--output-dir",
        str(output_dir),
        "--settings",
        *settings,
        "--batch-size",
        str(batch_size),
        "--max-new-tokens",
        "3",
        "--device",
        "cpu",
        "--no-progress",
    ]


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_evaluate_writes_llava_answer_files_and_a_summary(model_dir, dataset, tmp_path, capsys):
    root, questions = dataset
    output = tmp_path / "run"
    assert main(cli_args(model_dir, dataset, output, ["off", "auto", "0.1"], batch_size=3)) == 0
    table = capsys.readouterr().out
    assert "setting" in table and "auto" in table

    summary = json.loads((output / "summary.json").read_text())
    assert [s["setting"] for s in summary["settings"]] == ["off", "auto", "0.1"]
    assert (output / "summary.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # what the model's own selection keeps for each question, one image at a time
    model, processor = load_model_and_processor(str(model_dir), device="cpu")
    images = [Image.open(root / "images" / question["image"]) for question in questions]
    prompts = [build_prompt(processor, question["text"]) for question in questions]
    inputs = processor(images=images, text=prompts, padding=True, return_tensors="pt")
    auto_kept = model.select_image_tokens(**inputs, trim_ratio=-1).num_kept.tolist()  # per-image: batch-invariant
    assert len(set(auto_kept)) > 1
    for setting_summary in summary["settings"]:
        name = setting_summary["setting"]
        answers = read_jsonl(output / f"answers_{name}.jsonl")
        # LLaVA's answer-file format, one line per question, in question order
        assert [list(answer) for answer in answers] == [ANSWER_KEYS] * len(questions)
        assert [a["question_id"] for a in answers] == [q["question_id"] for q in questions]
        assert [a["prompt"] for a in answers] == [q["text"] for q in questions]
        assert all(isinstance(a["text"], str) and a["model_id"] == model_dir.name for a in answers)
        assert len({a["answer_id"] for a in answers}) == len(answers)

        kept = [a["metadata"]["num_kept"] for a in answers]
        image_tokens = [a["metadata"]["image_tokens"] for a in answers]
        if name == "off":
            assert kept == [576] * 5 and image_tokens == [576] * 5
        elif name == "0.1":
            assert kept == [57] * 5 and image_tokens == [58] * 5
        else:
            assert kept == auto_kept and image_tokens == [count + 1 for count in auto_kept]
        assert setting_summary["kept_tokens"]["mean"] == pytest.approx(sum(kept) / 5)

        # accuracy recomputed from the answer file: 4 questions have ground truth, 2 of them yes/no
        truths = ["Red", "yes", "no", questions[3]["answers"]]
        expected = sum(vqa_accuracy(a["text"], t) for a, t in zip(answers, truths, strict=False)) / 4
        assert setting_summary["num_answered"] == 5 and setting_summary["num_scored"] == 4
        assert setting_summary["accuracy"] == pytest.approx(expected)
        assert setting_summary["yes_no"]["num_questions"] == 2
        assert set(setting_summary["yes_no_by_category"]) == {"adversarial", "random"}
        timing = setting_summary["timing"]
        metadata = [a["metadata"] for a in answers]
        assert [m["batch_size"] for m in metadata] == [3, 3, 3, 2, 2]
        assert all(0 < m["ttft_seconds"] <= m["batch_seconds"] for m in metadata)
        total_seconds = metadata[0]["batch_seconds"] + metadata[3]["batch_seconds"]
        assert timing["seconds_per_question"] == pytest.approx(total_seconds / 5)
        assert timing["questions_per_second"] > 0 and 1 <= timing["mean_new_tokens"] <= 3


def test_metrics_on_hand_written_answers_without_loading_the_model(model_dir, dataset, tmp_path, monkeypatch):
    _, questions = dataset
    output = tmp_path / "given"
    output.mkdir()
    texts = ["Red.", "No", "No.", "One", "A red circle."]  # exact match: 1, 0, 1, 1 (see below); q4 has no truth
    rows = [record(q["question_id"], q["text"], t) for q, t in zip(questions, texts, strict=True)]
    for row in rows:
        row["model_id"] = model_dir.name
    write_jsonl(output / "answers_auto.jsonl", rows)

    def no_model(*args, **kwargs):
        raise AssertionError("every question is answered: the model must not be loaded")

    monkeypatch.setattr(evaluate_module, "load_model_and_processor", no_model)
    assert main(cli_args(model_dir, dataset, output, ["auto"])) == 0
    (summary,) = json.loads((output / "summary.json").read_text())["settings"]
    # "one" -> "1" matches all 9 of the "one" / "1" answers: every leave-one-out subset has >= 3 matches -> 1.0
    assert summary["accuracy"] == pytest.approx((1 + 0 + 1 + 1.0) / 4)
    assert summary["yes_no"]["tp"] == 0 and summary["yes_no"]["fn"] == 1 and summary["yes_no"]["tn"] == 1
    assert summary["yes_no"]["accuracy"] == 0.5 and summary["yes_no"]["f1"] == 0.0
    assert "kept_tokens" not in summary and "timing" not in summary  # hand-written answers carry no metadata

    rows[0]["model_id"] = "another-model"
    write_jsonl(output / "answers_auto.jsonl", rows)
    assert main(cli_args(model_dir, dataset, output, ["auto"])) == 2  # refuses to mix models


def test_an_interrupted_run_resumes_without_duplicates_or_losses(model_dir, dataset, tmp_path, monkeypatch):
    _, questions = dataset
    output = tmp_path / "resume"
    answers_path = output / "answers_auto.jsonl"
    original_write = AnswerFile.write
    writes = []

    def write_then_crash(self, row):
        if len(writes) == 3:
            raise KeyboardInterrupt  # killed after three answers, in the middle of the second batch
        writes.append(row["question_id"])
        original_write(self, row)

    monkeypatch.setattr(AnswerFile, "write", write_then_crash)
    assert main(cli_args(model_dir, dataset, output, ["auto"])) == 130
    monkeypatch.setattr(AnswerFile, "write", original_write)
    before = answers_path.read_text(encoding="utf-8")
    assert [a["question_id"] for a in read_jsonl(answers_path)] == [0, 1, 2]
    with open(answers_path, "a", encoding="utf-8") as file:  # and a line cut short by the kill
        file.write('{"question_id": "tri-3", "prompt": "How many')

    assert main(cli_args(model_dir, dataset, output, ["auto"])) == 0
    after = answers_path.read_text(encoding="utf-8")
    assert after.startswith(before)  # the answers already written are kept as they were
    answers = read_jsonl(answers_path)
    assert [a["question_id"] for a in answers] == [q["question_id"] for q in questions]  # each exactly once
    assert len({a["answer_id"] for a in answers}) == 5

    monkeypatch.setattr(evaluate_module, "load_model_and_processor", lambda *a, **k: pytest.fail("model loaded"))
    assert main(cli_args(model_dir, dataset, output, ["auto"])) == 0  # nothing left to do
    assert answers_path.read_text(encoding="utf-8") == after
    assert json.loads((output / "summary.json").read_text())["settings"][0]["num_answered"] == 5


def test_missing_or_broken_images_are_named(model_dir, dataset, tmp_path, capsys, monkeypatch):
    questions = write_jsonl(tmp_path / "q.jsonl", [{"question_id": 7, "image": "nowhere.png", "text": "Hi?"}])
    args = cli_args(model_dir, dataset, tmp_path / "out", ["auto"])
    args[args.index("--questions") + 1] = str(questions)
    args[args.index("--image-folder") + 1] = str(tmp_path)
    with monkeypatch.context() as patch:  # checked before the model is loaded
        patch.setattr(evaluate_module, "load_model_and_processor", lambda *a, **k: pytest.fail("model loaded"))
        assert main(args) == 2
    assert "nowhere.png" in capsys.readouterr().err

    (tmp_path / "broken.png").write_bytes(b"not a png")
    write_jsonl(questions, [{"question_id": 8, "image": "broken.png", "text": "Hi?"}])
    assert main(args) == 1  # the run ends, the question's record holds the reason
    assert "1 answers could not be given (question_id 8)" in capsys.readouterr().err
    (answer,) = read_jsonl(tmp_path / "out" / "answers_auto.jsonl")
    assert "Cannot read the image" in answer["error"] and "broken.png" in answer["error"]
    assert "question_id 8" in answer["error"] and answer["text"] == ""


def test_resuming_with_other_generation_options_is_refused(model_dir, dataset, tmp_path, capsys, monkeypatch):
    """Answers of 3 new tokens are not kept for a run that asks for 5 (nor is the new limit put in summary.json)."""
    _, questions = dataset
    output = tmp_path / "other_options"
    output.mkdir()
    rows = [record(q["question_id"], q["text"], "Red", max_new_tokens=3, dtype="auto") for q in questions[:2]]
    for row in rows:
        row["model_id"] = model_dir.name
    write_jsonl(output / "answers_auto.jsonl", rows)
    monkeypatch.setattr(evaluate_module, "load_model_and_processor", lambda *a, **k: pytest.fail("model loaded"))
    args = cli_args(model_dir, dataset, output, ["auto"])
    args[args.index("--max-new-tokens") + 1] = "5"
    assert main(args) == 2
    error = capsys.readouterr().err
    assert "answers generated with {'max_new_tokens': 3, 'dtype': 'auto'}, not with {'max_new_tokens': 5" in error
    assert not (output / "summary.json").exists()
    args += ["--dtype", "bfloat16"]
    args[args.index("--max-new-tokens") + 1] = "3"
    assert main(args) == 2
    assert "'dtype': 'bfloat16'" in capsys.readouterr().err


def over_limit_png(path):
    """A PNG whose header says 8000 x 8000 (64 million pixels, over `MAX_IMAGE_PIXELS`) with almost no data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", 8000, 8000, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)))


def test_a_bad_image_is_an_error_in_the_answer_file_and_a_rerun_retries_it(model_dir, dataset, tmp_path, capsys):
    """An unreadable file and an over-limit one among good images: the run goes on, the two records carry the error,
    the others are the answers of a run without them, and once the files are fixed a rerun answers just those two."""
    root, questions = dataset
    assert processing.MAX_IMAGE_PIXELS < 8000 * 8000
    images = tmp_path / "images"
    shutil.copytree(root / "images", images)
    (images / "val" / "broken.png").write_bytes(b"not a png at all")
    over_limit_png(images / "val" / "huge.png")
    bad = [
        {"question_id": "bad-1", "image": "val/broken.png", "text": "Is there a circle?" + SHORT, "answer": "yes"},
        {"question_id": "bad-2", "image": "val/huge.png", "text": "What colour?" + SHORT, "answer": "red"},
    ]
    # batches of 3 here give the same generate calls as batches of 2 without the bad questions
    mixed = [questions[0], bad[0], questions[1], questions[2], bad[1], *questions[3:]]
    write_jsonl(tmp_path / "mixed.jsonl", mixed)

    assert main(cli_args(model_dir, dataset, tmp_path / "clean", ["auto"], batch_size=2)) == 0
    clean = read_jsonl(tmp_path / "clean" / "answers_auto.jsonl")
    clean_summary = json.loads((tmp_path / "clean" / "summary.json").read_text())["settings"][0]
    capsys.readouterr()

    args = cli_args(model_dir, dataset, tmp_path / "mixed", ["auto"], batch_size=3)
    args[args.index("--questions") + 1] = str(tmp_path / "mixed.jsonl")
    args[args.index("--image-folder") + 1] = str(images)
    assert main(args) == 1  # incomplete, and says so in one line
    captured = capsys.readouterr()
    (error,) = [line for line in captured.err.splitlines() if line.startswith("error:")]
    assert error.startswith("error: 2 answers could not be given (question_id 'bad-1', 'bad-2')")
    answers = read_jsonl(tmp_path / "mixed" / "answers_auto.jsonl")
    assert [a["question_id"] for a in answers] == [q["question_id"] for q in mixed]
    by_id = {a["question_id"]: a for a in answers}
    for failed, reason in (("bad-1", "broken.png"), ("bad-2", "8000x8000 = 64,000,000 pixels, over the limit")):
        assert by_id[failed]["text"] == "" and reason in by_id[failed]["error"]
        assert f"question_id {failed!r}" in by_id[failed]["error"] and by_id[failed]["error"].count(". ") == 0
    for answer in clean:  # the same text, kept tokens and batch as without the bad questions
        mine = by_id[answer["question_id"]]
        assert "error" not in mine and mine["text"] == answer["text"]
        for key in ("num_kept", "image_tokens", "num_new_tokens", "batch_size"):
            assert mine["metadata"][key] == answer["metadata"][key]

    summary = json.loads((tmp_path / "mixed" / "summary.json").read_text())["settings"][0]
    assert (summary["num_answered"], summary["num_errors"], summary["num_questions"]) == (5, 2, 7)
    assert [error["question_id"] for error in summary["errors"]] == ["bad-1", "bad-2"]
    assert summary["errors"][0]["error"] == by_id["bad-1"]["error"]
    assert summary["partial"] == "5 of 7 questions answered, 2 could not be"
    # an error is an unanswered question, not a wrong answer: the scores are those of the clean run
    assert summary["num_scored"] == clean_summary["num_scored"] == 4
    assert summary["accuracy"] == clean_summary["accuracy"]
    header, row = (re.split(r"\s{2,}", line.strip()) for line in captured.out.splitlines()[:2])
    assert row[header.index("answered")] == "5/7" and row[header.index("errors")] == "2"
    assert "auto: 2 questions could not be answered (question_id 'bad-1', 'bad-2'); the first: Cannot" in captured.out

    # fixed files: the rerun answers the two questions, keeps every other record as it was
    Image.new("RGB", (120, 90), (220, 40, 40)).save(images / "val" / "broken.png")
    Image.new("RGB", (90, 120), (40, 60, 220)).save(images / "val" / "huge.png")
    assert main(args) == 0
    resumed = read_jsonl(tmp_path / "mixed" / "answers_auto.jsonl")
    assert [a["question_id"] for a in resumed] == [q["question_id"] for q in mixed]
    assert [a for a in resumed if a["question_id"] not in ("bad-1", "bad-2")] == clean_records(answers)
    assert all("error" not in a and a["metadata"]["image_tokens"] >= 1 for a in resumed)  # answered with its image
    summary = json.loads((tmp_path / "mixed" / "summary.json").read_text())["settings"][0]
    assert (summary["num_answered"], summary["num_errors"]) == (7, 0) and "partial" not in summary


def clean_records(answers):
    return [a for a in answers if "error" not in a]
