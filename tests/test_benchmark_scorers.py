"""The benchmark scorers against LLaVA's own (package `llava-torch==1.2.2.post1`, installed without dependencies) on
answers crafted to hit their edge cases: the same answer file gives the same numbers."""

import contextlib
import io
import json
import runpy
import sys

import pytest

from llava_trim.tools.evaluation.tasks import normalize_vqa_answer, pope_answer, pope_metrics, vqa_score
from llava_trim.tools.evaluation.tasks.choice import ScienceQA, scienceqa_letter
from llava_trim.tools.evaluation.tasks.vqa import _CONTRACTIONS, _NUMBERS, _PUNCTUATION, TextVQA
from llava_trim.tools.evaluation.tasks.yes_no import POPE

m4c = pytest.importorskip("llava.eval.m4c_evaluator", reason="LLaVA's package is the reference scorer")

CRAFTED_ANSWERS = [
    "The Two dogs.",
    "Its 10 oclock",
    "isn't it?",
    "It's ten o'clock",
    "a,b",
    "1,000",
    "x. y 3.5",
    "hello-world",
    "hi - there",
    "dont",
    "none",
    '"quoted"',
    "yes!",
    "." * 40,  # the reference removes at most 32 periods
    "e.g. the",
    "Ten",
    "An Apple",
    "youll see",
    "(a) red/blue",
    "3.14.",
    "Dakota Digital",
    "  spaced\tout\nlines ",
    "@home #1",
    "won't, can't",
    "",
]


def test_answer_normalisation_equals_evalai():
    reference = m4c.EvalAIAnswerProcessor()
    assert _CONTRACTIONS == reference.CONTRACTIONS and _PUNCTUATION == reference.PUNCTUATIONS
    assert {key: _NUMBERS[key] for key in _NUMBERS} == {key: reference.NUMBER_MAP[key] for key in _NUMBERS}
    for answer in CRAFTED_ANSWERS:
        assert normalize_vqa_answer(answer) == reference(answer), answer


def test_normalisation_hand_checked():
    assert normalize_vqa_answer("The Two dogs.") == "2 dogs"
    assert normalize_vqa_answer("Its 10 oclock") == "its 10 o'clock"
    assert normalize_vqa_answer("hi - there") == "hi there"  # "-" touches a space: removed
    assert normalize_vqa_answer("hello-world") == "hello world"  # else replaced by a space


@pytest.mark.parametrize(
    "annotators",
    [
        ["dakota"] * 7 + ["Dakota Digital"] * 3,
        ["two"] * 3 + ["2"] * 2 + ["three"] * 5,
        ["it's"] * 2 + ["its"] * 8,
        ["a cat"] + ["cat"] * 2 + ["dog"] * 7,
        ["yes"] * 10,
    ],
)
def test_vqa_score_equals_textvqa_evaluator(annotators):
    reference = m4c.TextVQAAccuracyEvaluator()
    for prediction in ["dakota", "2", "Two", "its", "It's", "cat", "The cat.", "dog", "yes", "no"]:
        expected = reference.eval_pred_list([{"pred_answer": prediction, "gt_answers": annotators}])
        assert vqa_score(prediction, annotators) == pytest.approx(expected), (prediction, annotators)


def test_vqa_score_hand_computed():
    # 3 of 10 say "two"/"2": leaving out a matching one leaves 2 matches (2/3, 3 times), else 3 (1, 7 times)
    assert vqa_score("2", ["two"] * 2 + ["2"] + ["three"] * 7) == pytest.approx((3 * 2 / 3 + 7 * 1) / 10)
    assert vqa_score("four", ["two"] * 10) == 0.0


def test_textvqa_score_equals_llava_eval_textvqa(tmp_path):
    eval_textvqa = pytest.importorskip("llava.eval.eval_textvqa")
    folder = tmp_path / "textvqa"
    folder.mkdir()
    annotations = [
        ("img1", "what brand is it?", ["dakota"] * 7 + ["Dakota Digital"] * 3),
        ("img2", "what time is it?", ["10 o'clock"] * 4 + ["ten"] * 6),
        ("img3", "how many?", ["two"] * 2 + ["2"] * 2 + ["3"] * 6),
        ("img4", "what does it say?", ["it's open"] * 3 + ["open"] * 7),
    ]
    (folder / "TextVQA_0.5.1_val.json").write_text(
        json.dumps({"data": [{"image_id": i, "question": q, "answers": a} for i, q, a in annotations]})
    )
    suffix = "\nAnswer the question using a single word or phrase."
    texts = ["Dakota.", "10 oclock", "Two", "Its open"]
    records = [
        {"question_id": image, "prompt": question.capitalize() + suffix, "text": text}
        for (image, question, _), text in zip(annotations, texts, strict=True)
    ]
    ours = TextVQA(tmp_path).score(records, [])["accuracy"]
    pred_list = [{"pred_answer": r["text"], "gt_answers": a[2]} for r, a in zip(records, annotations, strict=True)]
    assert [eval_textvqa.prompt_processor(r["prompt"]) for r in records] == [a[1] for a in annotations]
    assert ours == pytest.approx(m4c.TextVQAAccuracyEvaluator().eval_pred_list(pred_list))


POPE_CRAFTED = [
    ("Yes", "yes"),
    ("NO", "no"),  # read as yes by the reference
    ("Not really.", "no"),  # "Not" is not "not": yes
    ("no!", "no"),  # "no!" is not "no": yes
    ("No, there is not.", "no"),
    ("There is no dog. Yes.", "yes"),
    ("yes, not", "yes"),
    ("I don't think so", "no"),
    ("no.", "yes"),
    ("No", "yes"),
]


def llava_pope(answers: list[str], labels: list[str], tmp_path) -> dict:
    """Metrics printed by LLaVA's `eval_pope` for the answers against a label file."""
    eval_pope = pytest.importorskip("llava.eval.eval_pope")
    label_file = tmp_path / "labels.json"
    label_file.write_text("".join(json.dumps({"label": label}) + "\n" for label in labels))
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        eval_pope.eval_pope([{"text": text} for text in answers], str(label_file))
    values = {}
    for line in printed.getvalue().splitlines():
        name, _, value = line.partition(": ")
        if name in ("Accuracy", "Precision", "Recall", "F1 score", "Yes ratio"):
            values[name] = float(value)
    return values


def test_pope_reading_and_metrics_equal_llava_eval_pope(tmp_path):
    answers, labels = [a for a, _ in POPE_CRAFTED], [label for _, label in POPE_CRAFTED]
    assert [pope_answer(a) for a in answers] == ["yes", "yes", "yes", "yes", "no", "no", "no", "yes", "no", "no"]
    ours = pope_metrics(answers, labels)
    reference = llava_pope(answers, labels, tmp_path)
    assert ours["accuracy"] == pytest.approx(reference["Accuracy"])
    assert ours["precision"] == pytest.approx(reference["Precision"])
    assert ours["recall"] == pytest.approx(reference["Recall"])
    assert ours["f1"] == pytest.approx(reference["F1 score"])
    assert ours["yes_ratio"] == pytest.approx(reference["Yes ratio"])
    # by hand: predictions y y y y n n n y n n vs labels y n n n n y y n y y -> TP 1, FP 4, TN 1, FN 4
    assert (ours["tp"], ours["fp"], ours["tn"], ours["fn"]) == (1, 4, 1, 4)
    assert ours["accuracy"] == 0.2 and ours["precision"] == 0.2 and ours["recall"] == 0.2


def test_pope_splits_pair_answers_with_labels_by_position(tmp_path):
    coco = tmp_path / "pope" / "coco"
    coco.mkdir(parents=True)
    (coco / "coco_pope_random.json").write_text("".join(json.dumps({"label": x}) + "\n" for x in ["yes", "no", "no"]))
    questions = [{"question_id": i, "category": "random"} for i in range(3)]
    records = [{"question_id": i, "text": text} for i, text in enumerate(["Yes", "No", "Yes"])]
    split = POPE(tmp_path).score(records, questions)["splits"]["random"]
    assert split["accuracy"] == pytest.approx(2 / 3) and (split["tp"], split["fp"], split["tn"]) == (1, 1, 1)
    assert split == pope_metrics(["Yes", "No", "Yes"], ["yes", "no", "no"])


SCIENCE_CRAFTED = [
    ("A", 0, 2, True),
    ("B. blue", 1, 2, True),
    ("The answer is A.", 0, 3, True),
    ("The answer is A. The answer is B.", 0, 3, False),  # two answers: failed
    ("a", 0, 2, False),  # lowercase is not a letter
    ("E", 4, 3, False),  # beyond the choices
    ("C", 2, 3, True),
    ("Answer: C", 2, 3, False),
]


def test_scienceqa_score_equals_llava_eval_science_qa(tmp_path, monkeypatch):
    folder = tmp_path / "scienceqa"
    folder.mkdir()
    problems = {str(i): {"choices": ["x"] * n, "answer": a} for i, (_, a, n, _) in enumerate(SCIENCE_CRAFTED)}
    split = [*problems, "99"]  # "99" is never answered: FAILED
    problems["99"] = {"choices": ["x", "y"], "answer": 0}
    (folder / "problems.json").write_text(json.dumps(problems))
    (folder / "pid_splits.json").write_text(json.dumps({"test": split}))
    records = [
        {"question_id": str(i), "prompt": ("<image>\n" if i % 2 else "") + "Q", "text": text}
        for i, (text, _, _, _) in enumerate(SCIENCE_CRAFTED)
    ]
    results = tmp_path / "answers.jsonl"
    results.write_text("".join(json.dumps(record) + "\n" for record in records))
    output_result = tmp_path / "result.json"
    argv = ["eval_science_qa", "--base-dir", str(folder), "--result-file", str(results)]
    argv += ["--output-file", str(tmp_path / "out.json"), "--output-result", str(output_result)]
    monkeypatch.setattr(sys, "argv", argv)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        runpy.run_module("llava.eval.eval_science_qa", run_name="__main__")
    reference = json.loads(output_result.read_text())
    image_accuracy = float(printed.getvalue().split("IMG-Accuracy: ")[1].split("%")[0]) / 100

    ours = ScienceQA(tmp_path).score(records, [])
    assert ours["accuracy"] * 100 == pytest.approx(reference["acc"])
    assert ours["img_accuracy"] == pytest.approx(image_accuracy, abs=5e-5)
    assert ours["accuracy"] == pytest.approx(4 / 9)  # by hand: the four marked True, of nine
    for text, answer, count, correct in SCIENCE_CRAFTED:
        letter = scienceqa_letter(text)
        assert (letter is not None and "ABCDE".index(letter) == answer and answer < count) == correct, text
