# Copyright 2026 The llava-trim authors. Licensed under the Apache License, Version 2.0.
"""Open-ended short answers: VQAv2 and VizWiz (test servers), TextVQA (VQA accuracy), GQA (exact match).

Answers are normalised as the VQA / EvalAI evaluation does (the rule LLaVA's `m4c_evaluator.py` and its submission
converters apply): lowercase, commas and question marks dropped, punctuation removed or turned into spaces, periods
dropped unless before a digit, number words to digits, articles dropped, contractions restored.
"""

import re
import sys
from collections.abc import Sequence
from pathlib import Path

from .common import Benchmark, read_json, read_jsonl, write_json

# The VQA evaluation's contraction table: spelling without (some) apostrophes -> the spelling with them.
_CONTRACTIONS = dict(
    pair.split("=", 1)
    for pair in """
aint=ain't arent=aren't cant=can't couldve=could've couldnt=couldn't couldn'tve=couldn't've couldnt've=couldn't've
didnt=didn't doesnt=doesn't dont=don't hadnt=hadn't hadnt've=hadn't've hadn'tve=hadn't've hasnt=hasn't
havent=haven't hed=he'd hed've=he'd've he'dve=he'd've hes=he's howd=how'd howll=how'll hows=how's Id've=I'd've
I'dve=I'd've Im=I'm Ive=I've isnt=isn't itd=it'd itd've=it'd've it'dve=it'd've itll=it'll let's=let's maam=ma'am
mightnt=mightn't mightnt've=mightn't've mightn'tve=mightn't've mightve=might've mustnt=mustn't mustve=must've
neednt=needn't notve=not've oclock=o'clock oughtnt=oughtn't ow's'at='ow's'at 'ows'at='ow's'at 'ow'sat='ow's'at
shant=shan't shed've=she'd've she'dve=she'd've she's=she's shouldve=should've shouldnt=shouldn't
shouldnt've=shouldn't've shouldn'tve=shouldn't've somebody'd=somebodyd somebodyd've=somebody'd've
somebody'dve=somebody'd've somebodyll=somebody'll somebodys=somebody's someoned=someone'd someoned've=someone'd've
someone'dve=someone'd've someonell=someone'll someones=someone's somethingd=something'd
somethingd've=something'd've something'dve=something'd've somethingll=something'll thats=that's thered=there'd
thered've=there'd've there'dve=there'd've therere=there're theres=there's theyd=they'd theyd've=they'd've
they'dve=they'd've theyll=they'll theyre=they're theyve=they've twas='twas wasnt=wasn't wed've=we'd've
we'dve=we'd've weve=we've werent=weren't whatll=what'll whatre=what're whats=what's whatve=what've whens=when's
whered=where'd wheres=where's whereve=where've whod=who'd whod've=who'd've who'dve=who'd've wholl=who'll whos=who's
whove=who've whyll=why'll whyre=why're whys=why's wont=won't wouldve=would've wouldnt=wouldn't
wouldnt've=wouldn't've wouldn'tve=wouldn't've yall=y'all yall'll=y'all'll y'allll=y'all'll yall'd've=y'all'd've
y'alld've=y'all'd've y'all'dve=y'all'd've youd=you'd youd've=you'd've you'dve=you'd've youll=you'll youre=you're
youve=you've
""".split()
)
_NUMBER_WORDS = "zero one two three four five six seven eight nine ten".split()
_NUMBERS = {word: str(value) for value, word in enumerate(_NUMBER_WORDS)}
_NUMBERS["none"] = "0"
_ARTICLES = {"a", "an", "the"}
_PUNCTUATION = list(';/[]"{}()=+\\_-><@`,?!')
_COMMA_BETWEEN_DIGITS = re.compile(r"(?<=\d),+(?=\d)")
_PERIOD_NOT_BEFORE_DIGIT = re.compile(r"\.(?!\d)")
# The reference passes `re.UNICODE` (32) where `re.sub` takes its count: at most 32 periods are removed.
_MAX_PERIODS_REMOVED = 32


def normalize_vqa_answer(answer: str) -> str:
    """
    Normalise an answer as the VQA / EvalAI evaluation does.

    `"The Two dogs."` -> `"2 dogs"`; `"Its 10 oclock"` -> `"it's 10 o'clock"`; `"isn't it?"` -> `"isn't it"`.
    """
    text = answer.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    text = text.replace("\n", " ").replace("\t", " ").strip()
    # punctuation: removed where it touches a space (or digits are comma-separated), else replaced by a space;
    # both tests look at the text before any replacement
    spaced = text
    for mark in _PUNCTUATION:
        touches_space = mark + " " in spaced or " " + mark in spaced
        if touches_space or _COMMA_BETWEEN_DIGITS.search(spaced):
            text = text.replace(mark, "")
        else:
            text = text.replace(mark, " ")
    text = _PERIOD_NOT_BEFORE_DIGIT.sub("", text, count=_MAX_PERIODS_REMOVED)
    words = [_NUMBERS.get(word, word) for word in text.lower().split()]
    words = [_CONTRACTIONS.get(word, word) for word in words if word not in _ARTICLES]
    return " ".join(words)


def vqa_score(prediction: str, annotator_answers: Sequence[str]) -> float:
    """
    VQA accuracy of one prediction against the annotators' answers (TextVQA, VQAv2: ten each), after normalising
    both: for each annotator left out, `min(1, matches among the others / 3)`, averaged.
    """
    answers = [normalize_vqa_answer(answer) for answer in annotator_answers]
    predicted = normalize_vqa_answer(prediction)
    if predicted not in answers:
        return 0.0
    scores = []
    for left_out in range(len(answers)):
        matches = sum(answer == predicted for index, answer in enumerate(answers) if index != left_out)
        scores.append(min(1.0, matches / 3))
    return sum(scores) / len(scores)


class VQAv2(Benchmark):
    name, title, folder = "vqav2", "VQAv2 (test-dev)", "vqav2"
    question_file = "llava_vqav2_mscoco_test-dev2015.jsonl"
    image_folder = "test2015"
    full_split_file = "llava_vqav2_mscoco_test2015.jsonl"
    scoring = "EvalAI test server (vqav2_test-dev2015_<setting>.json)"

    def write_outputs(self, records, questions, output_dir: Path, tag: str) -> list:
        # the server takes the whole test2015 split: questions outside test-dev get an empty answer
        split_path = self.root / self.full_split_file
        split = read_jsonl(split_path) if split_path.is_file() else questions
        answers = {record["question_id"]: record["text"] for record in records}
        submission = [
            {"question_id": question_id, "answer": normalize_vqa_answer(answers.get(question_id, ""))}
            for question_id in (question["question_id"] for question in split)
        ]
        return [write_json(output_dir / f"vqav2_test-dev2015_{tag}.json", submission)]


class VizWiz(Benchmark):
    name, title, folder = "vizwiz", "VizWiz (test)", "vizwiz"
    question_file = "llava_test.jsonl"
    image_folder = "test"
    scoring = "EvalAI test server (vizwiz_test_<setting>.json)"

    def write_outputs(self, records, questions, output_dir: Path, tag: str) -> list:
        answers = {record["question_id"]: record["text"] for record in records}
        missing = [question["question_id"] for question in questions if question["question_id"] not in answers]
        if missing:  # the server needs every test image answered
            print(
                f"{self.title}: {len(missing)} questions are unanswered, so no submission file was written: run the "
                "same command again to answer them.",
                file=sys.stderr,
            )
            return []
        submission = [
            {"image": question["image"], "answer": normalize_vqa_answer(answers[question["question_id"]])}
            for question in questions
        ]
        return [write_json(output_dir / f"vizwiz_test_{tag}.json", submission)]


def textvqa_question(prompt: str) -> str:
    """The TextVQA question inside a LLaVA prompt (first line; the OCR-token line and the instruction dropped)."""
    if prompt.startswith("OCR tokens: "):
        match = re.search(r"Question: (.*?) Short answer:", prompt, re.DOTALL)
        if match is None:
            raise ValueError(f"Cannot find the question in the TextVQA prompt {prompt!r}.")
        question = match.group(1)
    else:
        lines = prompt.split("\n")
        if len(lines) == 3 and "Reference OCR token: " in prompt:
            question = lines[1] if prompt.startswith("Reference OCR token:") else lines[0]
        elif len(lines) == 2:
            question = lines[0]
        else:
            raise ValueError(
                f"Cannot find the question in the TextVQA prompt {prompt!r}: LLaVA's prompts are the question, "
                "optionally a 'Reference OCR token: ...' line, and the answer instruction, one per line."
            )
    return question.lower()


class TextVQA(Benchmark):
    name, title, folder = "textvqa", "TextVQA (val)", "textvqa"
    question_file = "llava_textvqa_val_v051_ocr.jsonl"
    image_folder = "train_images"
    annotation_file = "TextVQA_0.5.1_val.json"
    scoring = "local: VQA accuracy with EvalAI normalisation (TextVQA_0.5.1_val.json)"

    def score(self, records, questions) -> dict | None:
        path = self.root / self.annotation_file
        if not path.is_file() or not records:
            return None
        annotations = {
            (annotation["image_id"], annotation["question"].lower()): annotation["answers"]
            for annotation in read_json(path)["data"]
        }
        scores = []
        for record in records:
            key = (record["question_id"], textvqa_question(record["prompt"]))
            if key not in annotations:
                raise ValueError(f"{path} has no question {key[1]!r} for image {key[0]!r}.")
            scores.append(vqa_score(record["text"], annotations[key]))
        return {"accuracy": sum(scores) / len(scores), "num_scored": len(scores)}


class GQA(Benchmark):
    name, title, folder = "gqa", "GQA (test-dev balanced)", "gqa"
    question_file = "llava_gqa_testdev_balanced.jsonl"
    image_folder = "data/images"
    ground_truth_file = "data/testdev_balanced_questions.json"
    scoring = "local: exact match (data/testdev_balanced_questions.json); GQA's eval.py on the predictions file"

    @staticmethod
    def prediction(text: str) -> str:
        return text.rstrip(".").lower()

    def write_outputs(self, records, questions, output_dir: Path, tag: str) -> list:
        predictions = [
            {"questionId": record["question_id"], "prediction": self.prediction(record["text"])} for record in records
        ]
        return [write_json(output_dir / f"testdev_balanced_predictions_{tag}.json", predictions)]

    def score(self, records, questions) -> dict | None:
        path = self.root / self.ground_truth_file
        if not path.is_file() or not records:
            return None
        truth = read_json(path)
        predictions = {str(record["question_id"]): self.prediction(record["text"]) for record in records}
        # GQA's eval.py scores every question of the tier; an unanswered one counts as wrong
        correct = [
            predictions.get(str(question_id)) == item["answer"]
            for question_id, item in truth.items()
            if item.get("isBalanced", True)
        ]
        return {"accuracy": sum(correct) / len(correct), "num_scored": len(correct)}
