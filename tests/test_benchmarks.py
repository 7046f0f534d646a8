"""Tests of `llava_trim.tools.evaluation.tasks` through the evaluation tool: LLaVA-1.5's 12 benchmarks read from a
miniature of `playground/data/eval` in the upstream layout, prompts against LLaVA's own conversation code, every output
format, and every local score on hand-written answers (hand-computed expectations)."""

import base64
import io
import json
import re

import pytest
from llava_eval_fixture import LETTER, SHORT, build_llava_eval, mmbench_rows, write_jsonl, write_tsv
from PIL import Image

import llava_trim.tools.evaluate as evaluate_module
from llava_trim.tools.evaluate import main
from llava_trim.tools.evaluation.answers import new_answer_id
from llava_trim.tools.evaluation.generation import build_prompt
from llava_trim.tools.evaluation.tasks import BENCHMARKS, get_benchmarks


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return build_llava_eval(tmp_path_factory.mktemp("playground") / "data" / "eval")


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def cli(model_dir, data_root, output, *benchmarks, settings=("auto",)):
    return [
        "--model",
        str(model_dir),
        "--benchmark",
        *benchmarks,
        "--data-root",
        str(data_root),
        "--output-dir",
        str(output),
        "--settings",
        *settings,
        "--max-new-tokens",
        "2",
        "--batch-size",
        "2",
        "--device",
        "cpu",
        "--no-progress",
        "--no-plot",
    ]


# ---------------------------------------------------------------------------------------------------------------------
# Questions and prompts, as LLaVA-1.5 asks them
# ---------------------------------------------------------------------------------------------------------------------


def llava_prompt(user_turn: str) -> str:
    """LLaVA's own `vicuna_v1` prompt for one user turn (the reference)."""
    conversation = pytest.importorskip("llava.conversation", reason="LLaVA's package is the reference for prompts")
    chat = conversation.conv_templates["vicuna_v1"].copy()
    chat.append_message(chat.roles[0], user_turn)
    chat.append_message(chat.roles[1], None)
    return chat.get_prompt()


def test_prompts_equal_llava_conversation_for_every_benchmark(data_root, model_dir):
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(model_dir, trust_remote_code=True)
    benchmarks = get_benchmarks(["all"], data_root)
    assert [b.name for b in benchmarks] == list(BENCHMARKS)  # all 12 found in the upstream layout
    for benchmark in benchmarks:
        for question in benchmark.load_questions():
            with_image = question.get("image_path") is not None or question.get("image_base64") is not None
            expected = llava_prompt(("<image>\n" if with_image else "") + question["text"])
            assert build_prompt(processor, question["text"], with_image) == expected, benchmark.name


def test_questions_are_built_as_llava_builds_them(data_root):
    by_name = {b.name: b for b in get_benchmarks(["all"], data_root)}
    vizwiz = by_name["vizwiz"].load_questions()[0]
    assert vizwiz["text"].endswith("respond with 'Unanswerable'.\nAnswer the question using a single word or phrase.")

    science = by_name["scienceqa"].load_questions()
    assert science[0]["text"] == "Context: A red block.\nWhich colour?\nA. red\nB. blue" + LETTER
    assert science[0]["prompt"] == "<image>\n" + science[0]["text"]  # LLaVA's IMG marker in the answer file
    assert science[0]["image_path"].name == "image.png"
    assert science[1]["image_path"] is None and science[1]["prompt"] == science[1]["text"]  # asked as text

    first, second = by_name["mmbench"].load_questions()
    assert first["question_id"] == 0 and second["question_id"] == 7
    assert first["prompt"] == "What colour is the picture?\nA. red\nB. blue"  # "nan" hint and empty C/D dropped
    assert first["text"] == first["prompt"] + LETTER
    assert second["prompt"] == "Look carefully.\nWhich one is a fruit?\nA. apple\nB. car"  # options stop at "NA"
    assert second["answer_fields"] == {"round_id": 0, "options": ["apple", "car"], "option_char": ["A", "B"]}
    assert Image.open(io.BytesIO(base64.b64decode(first["image_base64"]))).size == (64, 48)
    chinese = by_name["mmbench_cn"].load_questions()[0]
    assert chinese["text"] == "图中是什么颜色？\nA. red\nB. blue\n请直接回答选项字母。"

    seed = by_name["seed"].load_questions()[0]
    assert seed["image_path"] == data_root / "seed_bench" / "SEED-Bench-image" / "1454426_2591111986.jpg"
    mme = by_name["mme"].load_questions()[0]
    assert mme["image_path"] == data_root / "MME/MME_Benchmark_release_version/existence/000000006040.jpg"


def test_benchmark_errors_name_the_problem(data_root, tmp_path, model_dir, capsys):
    assert main(cli(model_dir, data_root, tmp_path / "out", "vqa3")) == 2
    assert "Unknown benchmark 'vqa3'" in capsys.readouterr().err
    assert main(cli(model_dir, tmp_path / "empty", tmp_path / "out", "all")) == 2
    assert "No benchmark's question file is under" in capsys.readouterr().err
    assert main(cli(model_dir, tmp_path / "empty", tmp_path / "out", "pope")) == 2
    assert "llava_pope_test.jsonl not found" in capsys.readouterr().err
    assert main([*cli(model_dir, data_root, tmp_path / "out", "pope"), "--image-folder", str(tmp_path)]) == 2
    assert "--image-folder and --annotations go with --questions" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------------------
# Every benchmark end to end with the tiny model: LLaVA answer files and each official format
# ---------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def all_run(data_root, model_dir, tmp_path_factory):
    output = tmp_path_factory.mktemp("all")
    assert main(cli(model_dir, data_root, output, "all")) == 0
    return output


def test_every_benchmark_writes_llava_answer_files_in_question_order(all_run, data_root):
    for benchmark in get_benchmarks(["all"], data_root):
        questions = benchmark.load_questions()
        answers = read_jsonl(all_run / benchmark.name / "answers_auto.jsonl")
        keys = [(q["question_id"], q["prompt"]) for q in questions]
        assert [(a["question_id"], a["prompt"]) for a in answers] == keys
        expected_keys = ["question_id", "prompt", "text", "answer_id", "model_id", "metadata"]
        if benchmark.name.startswith("mmbench"):
            expected_keys = ["question_id", "round_id", "prompt", "text", "options", "option_char", *expected_keys[3:]]
        assert all(list(answer) == expected_keys for answer in answers), benchmark.name
        summary = json.loads((all_run / benchmark.name / "summary.json").read_text())
        assert summary["benchmark"] == benchmark.name and summary["settings"][0]["num_answered"] == len(questions)
    science = read_jsonl(all_run / "scienceqa" / "answers_auto.jsonl")
    assert "num_kept" in science[0]["metadata"] and "num_kept" not in science[1]["metadata"]  # text-only: no image


def test_official_formats(all_run, data_root):
    answers = {name: read_jsonl(all_run / name / "answers_auto.jsonl") for name in BENCHMARKS}

    vqav2 = json.loads((all_run / "vqav2" / "vqav2_test-dev2015_auto.json").read_text())
    assert [item["question_id"] for item in vqav2] == [262144000, 262144001, 1]  # the whole test2015 split
    assert vqav2[2]["answer"] == "" and set(vqav2[0]) == {"question_id", "answer"}

    gqa = json.loads((all_run / "gqa" / "testdev_balanced_predictions_auto.json").read_text())
    assert gqa == [
        {"questionId": a["question_id"], "prediction": a["text"].rstrip(".").lower()} for a in answers["gqa"]
    ]

    vizwiz = json.loads((all_run / "vizwiz" / "vizwiz_test_auto.json").read_text())
    assert [item["image"] for item in vizwiz] == ["VizWiz_test_00000000.jpg", "VizWiz_test_00000001.jpg"]

    mme_lines = (all_run / "mme" / "mme_auto" / "existence.txt").read_text(encoding="utf-8").splitlines()
    assert [line.split("\t")[:3] for line in mme_lines] == [
        ["000000006040.txt", "Is there a train in this image? Please answer yes or no.", "Yes"],
        ["000000006040.txt", "Is there a bed in this image?  Please answer yes or no.", "No"],
    ]

    openpyxl = pytest.importorskip("openpyxl")
    sheet = openpyxl.load_workbook(all_run / "mmbench" / "mmbench_dev_20230712_auto.xlsx").active
    rows = [list(row) for row in sheet.iter_rows(values_only=True)]
    assert rows[0] == ["index", "question", "A", "B", "C", "D", "prediction", "answer", "split"]
    assert rows[1][:2] == [0, "What colour is the picture?"] and rows[1][4] is None
    assert [row[6] or "" for row in rows[1:]] == [a["text"] for a in answers["mmbench"]]

    # LLaVA's convert_seed_for_submission.py: SEED-Bench.json's order and its string ids
    seed = read_jsonl(all_run / "seed" / "seed_bench_auto.jsonl")
    by_id = {a["question_id"]: a["text"] for a in answers["seed"]}
    assert seed == [
        {"question_id": "101670", "prediction": by_id[101670]},
        {"question_id": "101669", "prediction": by_id[101669]},
    ]

    mmvet = json.loads((all_run / "mmvet" / "mmvet_auto.json").read_text())
    assert mmvet == {"v1_0": answers["mmvet"][0]["text"]}


# ---------------------------------------------------------------------------------------------------------------------
# Local scores on hand-written answers (the model is never loaded)
# ---------------------------------------------------------------------------------------------------------------------


def write_answers(output, benchmark, data_root, texts, model_id):
    questions = BENCHMARKS[benchmark](data_root).load_questions()
    rows = [
        {
            "question_id": q["question_id"],
            "prompt": q["prompt"],
            "text": text,
            "answer_id": new_answer_id(),
            "model_id": model_id,
            "metadata": {"setting": "auto"},
        }
        for q, text in zip(questions, texts, strict=True)
    ]
    write_jsonl(output / benchmark / "answers_auto.jsonl", rows)


@pytest.fixture
def no_model(monkeypatch):
    monkeypatch.setattr(evaluate_module, "load_model_and_processor", lambda *a, **k: pytest.fail("model loaded"))


def score_of(output, benchmark):
    return json.loads((output / benchmark / "summary.json").read_text())["settings"][0]["score"]


def test_local_scores_hand_computed(data_root, model_dir, tmp_path, no_model):
    output = tmp_path / "scores"
    model_id = model_dir.name
    write_answers(output, "gqa", data_root, ["Yes.", "a cup"], model_id)  # "yes" == "yes"; "a cup" != "cup"
    write_answers(output, "scienceqa", data_root, ["A", "The answer is B."], model_id)  # right; wrong (answer A)
    write_answers(output, "textvqa", data_root, ["Dakota", "2011."], model_id)
    write_answers(output, "pope", data_root, ["Yes", "No, there is not.", "NO", "no!"], model_id)
    write_answers(output, "mme", data_root, ["Yes", "No"], model_id)
    write_answers(output, "seed", data_root, ["A", "B."], model_id)  # exact match: "B." is wrong
    names = ["gqa", "scienceqa", "textvqa", "pope", "mme", "seed"]
    assert main(cli(model_dir, data_root, output, *names)) == 0

    assert score_of(output, "gqa") == {"accuracy": 0.5, "num_scored": 2}
    science = score_of(output, "scienceqa")
    assert science["accuracy"] == 0.5 and science["img_accuracy"] == 1.0 and science["num_img"] == 1
    # "dakota": 7 of 10 annotators -> every leave-one-out subset has >= 6 matches -> 1.0; "2011." -> "2011" -> 1.0
    assert score_of(output, "textvqa") == {"accuracy": 1.0, "num_scored": 2}
    pope = score_of(output, "pope")["splits"]
    # adversarial: "Yes" (label yes) TP, "No, there is not." (label no) TN; popular: "NO" is read as yes -> FP
    assert pope["adversarial"]["accuracy"] == 1.0 and pope["adversarial"]["f1"] == 1.0
    assert pope["popular"]["fp"] == 1 and pope["popular"]["accuracy"] == 0.0
    assert pope["random"]["tp"] == 1 and pope["random"]["accuracy"] == 1.0  # "no!" is read as yes too
    mme = score_of(output, "mme")
    assert mme["perception"] == 200.0 and mme["perception_tasks"]["existence"] == {
        "acc": 100.0,
        "acc_plus": 100.0,
        "score": 200.0,
    }
    seed = score_of(output, "seed")
    assert seed["accuracy"] == 0.5 and seed["image_accuracy"] == 0.5
    assert seed["per_question_type"] == {"Scene Understanding": 0.0, "Instances Counting": 1.0}


def test_servers_and_judges_get_files_not_scores(data_root, model_dir, tmp_path, no_model):
    output = tmp_path / "servers"
    names = ["vqav2", "vizwiz", "mmbench", "llava_bench", "mmvet"]
    for name in names:
        count = len(BENCHMARKS[name](data_root).load_questions())
        write_answers(output, name, data_root, ["The Two dogs."] * count, model_dir.name)
    assert main(cli(model_dir, data_root, output, *names)) == 0
    for name in names:
        assert score_of(output, name) is None
    vqav2 = json.loads((output / "vqav2" / "vqav2_test-dev2015_auto.json").read_text())
    assert vqav2[0]["answer"] == "2 dogs"  # EvalAI normalisation, as LLaVA's converter applies


def test_mmbench_missing_cells_follow_pandas(tmp_path):
    from llava_trim.tools.evaluation.tasks.choice import MMBench, is_missing

    assert all(is_missing(cell) for cell in ["", "nan", "NaN", "None", "none", "NA", "N/A", "null", "NULL"])
    assert not any(is_missing(cell) for cell in ["0", "No", "n", "nana", "None of these"])
    rows = mmbench_rows()
    rows[0]["index"] = "12"
    write_tsv(tmp_path / "mmbench" / "mmbench_dev_20230712.tsv", rows)
    question = MMBench(tmp_path).load_questions()[0]
    assert question["question_id"] == 12 and question["prompt"].endswith("\nA. red\nB. blue")


def test_textvqa_question_extraction_matches_llava():
    eval_textvqa = pytest.importorskip("llava.eval.eval_textvqa")
    from llava_trim.tools.evaluation.tasks import textvqa_question

    prompts = [
        "What is it?\nReference OCR token: a, b" + SHORT,
        "Reference OCR token: a, b\nWhat is it?" + SHORT,
        "What Is It?" + SHORT,
        "OCR tokens: x y Question: What is it? Short answer:",
    ]
    for prompt in prompts:
        assert textvqa_question(prompt) == eval_textvqa.prompt_processor(prompt)
    with pytest.raises(ValueError, match="Cannot find the question"):
        textvqa_question("one\ntwo\nthree\nfour")


def test_vizwiz_submission_needs_every_question(data_root, tmp_path, capsys):
    from llava_trim.tools.evaluation.tasks.vqa import VizWiz

    vizwiz = VizWiz(data_root)
    questions = vizwiz.load_questions()
    records = [{"question_id": questions[0]["question_id"], "text": "Unanswerable"}]
    assert vizwiz.write_outputs(records, questions, tmp_path, "auto") == []
    assert "1 questions are unanswered, so no submission file was written" in capsys.readouterr().err
    records.append({"question_id": questions[1]["question_id"], "text": "A red box."})
    (path,) = vizwiz.write_outputs(records, questions, tmp_path, "auto")
    assert json.loads(path.read_text()) == [
        {"image": "VizWiz_test_00000000.jpg", "answer": "unanswerable"},
        {"image": "VizWiz_test_00000001.jpg", "answer": "red box"},
    ]


def test_pope_on_a_part_of_the_questions_says_partial_and_averages_what_was_answered(
    data_root, model_dir, tmp_path, no_model, capsys
):
    output = tmp_path / "pope_partial"
    write_answers(output, "pope", data_root, ["Yes", "No, there is not.", "NO", "no!"], model_dir.name)
    assert main([*cli(model_dir, data_root, output, "pope"), "--limit", "1"]) == 0
    score = score_of(output, "pope")
    # one right answer, in the adversarial split: the two splits without an answer are not averaged in as zeros
    assert list(score["splits"]) == ["adversarial"] and score["splits"]["adversarial"]["num_questions"] == 1
    assert score["accuracy"] == 1.0 and score["f1"] == 1.0
    assert score["partial"] is True and (score["num_answered"], score["num_questions"]) == (1, 4)
    printed = capsys.readouterr().out
    assert "auto: f1 1, accuracy 1," in printed and "(partial: 1 of 4 questions answered)" in printed
    header, row = (re.split(r"\s{2,}", line.strip()) for line in printed.splitlines()[1:3])  # after "== pope"
    assert row[header.index("accuracy")] == "100.00%"  # the benchmark's accuracy, not "-"
    assert row[header.index("yes/no F1")] == "1.000"
