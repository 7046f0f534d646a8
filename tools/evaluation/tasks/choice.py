# Copyright 2026 The llava-trim authors. Licensed under the Apache License, Version 2.0.
"""Multiple choice: ScienceQA-IMG (local accuracy), MMBench and MMBench-CN (submission sheet), SEED-Bench."""

import csv
import json
import re
import sys
from collections import defaultdict
from pathlib import Path

from .common import Benchmark, read_json, require_fields, write_lines

SINGLE_LETTER = "Answer with the option's letter from the given choices directly."
SINGLE_LETTER_CN = "请直接回答选项字母。"

# ---------------------------------------------------------------------------------------------------------------------
# ScienceQA
# ---------------------------------------------------------------------------------------------------------------------

SCIENCEQA_OPTIONS = ["A", "B", "C", "D", "E"]


def scienceqa_letter(text: str) -> str | None:
    """The option letter of a ScienceQA answer, as LLaVA's `eval_science_qa.py` reads it: the text is a letter, or
    starts with "X. ", or holds exactly one "The answer is X"; else `None` (counted wrong)."""
    if text in SCIENCEQA_OPTIONS:
        return text
    if len(text) >= 3 and text[0] in SCIENCEQA_OPTIONS and text[1:3] == ". ":
        return text[0]
    found = re.findall(r"The answer is ([A-Z]).", text)
    return found[0] if len(found) == 1 else None


class ScienceQA(Benchmark):
    name, title, folder = "scienceqa", "ScienceQA-IMG (test)", "scienceqa"
    question_file = "llava_test_CQM-A.json"
    image_folder = "images/test"
    max_new_tokens = 1024
    scoring = "local: accuracy and IMG accuracy (problems.json, pid_splits.json)"

    def load_questions(self) -> list[dict]:
        """LLaVA's `model_vqa_science --single-pred-prompt`: the first human turn (context, question, options) without
        its `<image>` tag, then the single-letter instruction; questions without an image are asked as text."""
        self.check_present()
        records = read_json(self.question_path)
        require_fields(self.question_path, records, ("id", "conversations"))
        questions = []
        for record in records:
            text = record["conversations"][0]["value"].replace("<image>", "").strip() + "\n" + SINGLE_LETTER
            has_image = "image" in record
            questions.append(
                {
                    "question_id": record["id"],
                    "text": text,
                    "prompt": "<image>\n" + text if has_image else text,
                    "image_path": self.root / self.image_folder / record["image"] if has_image else None,
                }
            )
        return questions

    def score(self, records, questions) -> dict | None:
        problems_path, splits_path = self.root / "problems.json", self.root / "pid_splits.json"
        if not problems_path.is_file() or not splits_path.is_file() or not records:
            return None
        problems, split = read_json(problems_path), read_json(splits_path)["test"]
        answers = {record["question_id"]: record for record in records}
        correct, image_correct, image_total = 0, 0, 0
        for problem_id in split:
            problem = problems[problem_id]
            record = answers.get(problem_id, {"text": "FAILED", "prompt": "Unknown"})
            letter = scienceqa_letter(record["text"])
            choices = SCIENCEQA_OPTIONS[: len(problem["choices"])]
            is_correct = letter in choices and choices.index(letter) == problem["answer"]
            correct += is_correct
            if "<image>" in record["prompt"]:  # the reference counts a question as IMG by its prompt
                image_total += 1
                image_correct += is_correct
        return {
            "accuracy": correct / len(split),
            "img_accuracy": image_correct / image_total if image_total else None,
            "num_scored": len(split),
            "num_img": image_total,
        }


# ---------------------------------------------------------------------------------------------------------------------
# MMBench
# ---------------------------------------------------------------------------------------------------------------------

MMBENCH_OPTIONS = ["A", "B", "C", "D"]
# cells pandas' `read_table` reads as missing (NaN) by default, and LLaVA's own "nan" / "none" test
_MISSING_CELLS = {
    "",
    "#N/A",
    "#N/A N/A",
    "#NA",
    "-1.#IND",
    "-1.#QNAN",
    "-NaN",
    "-nan",
    "1.#IND",
    "1.#QNAN",
    "<NA>",
    "N/A",
    "NA",
    "NULL",
    "NaN",
    "None",
    "n/a",
    "nan",
    "null",
}
_SUBMISSION_DROPPED = {"hint", "category", "source", "image", "comment", "l2-category"}


def is_missing(cell: str | None) -> bool:
    return cell is None or cell in _MISSING_CELLS or cell.lower() in ("nan", "none")


def read_tsv(path: Path) -> tuple[list[str], list[dict]]:
    """Header and rows of a TSV (MMBench's: one base64 image per row, so fields are large)."""
    csv.field_size_limit(sys.maxsize)
    with open(path, encoding="utf-8", newline="") as file:
        reader = csv.DictReader(file, delimiter="\t")
        rows = list(reader)
        return list(reader.fieldnames or []), rows


def _index(cell: str) -> int | str:
    return int(cell) if cell.lstrip("-").isdigit() else cell


class MMBench(Benchmark):
    name, title, folder = "mmbench", "MMBench (dev)", "mmbench"
    question_file = "mmbench_dev_20230712.tsv"
    language = "en"
    max_new_tokens = 1024
    scoring = "MMBench evaluation server (submission sheet mmbench_<split>_<setting>.xlsx)"

    def load_questions(self) -> list[dict]:
        """LLaVA's `model_vqa_mmbench --single-pred-prompt`: hint (if any), question, `X. option` lines up to the
        first empty option, then the single-letter instruction (Chinese for MMBench-CN); the image is base64."""
        self.check_present()
        header, rows = read_tsv(self.question_path)
        require_fields(self.question_path, [dict.fromkeys(header)], ("index", "question", "hint", "image", "A", "B"))
        instruction = SINGLE_LETTER_CN if self.language == "cn" else SINGLE_LETTER
        questions = []
        for row in rows:
            options = []
            for letter in MMBENCH_OPTIONS:
                if is_missing(row.get(letter)):
                    break
                options.append(row[letter])
            question = row["question"]
            if not is_missing(row["hint"]):
                question = row["hint"] + "\n" + question
            for letter, option in zip(MMBENCH_OPTIONS, options, strict=False):
                question = question + "\n" + letter + ". " + option
            questions.append(
                {
                    "question_id": _index(row["index"]),
                    "text": question + "\n" + instruction,
                    "prompt": question,
                    "image_base64": row["image"],
                    "answer_fields": {
                        "round_id": 0,
                        "options": options,
                        "option_char": MMBENCH_OPTIONS[: len(options)],
                    },
                }
            )
        return questions

    def submission_rows(self, records) -> tuple[list[str], list[list]]:
        """The submission sheet: the TSV without hint, category, source, image, comment and l2-category, with a
        `prediction` column inserted as the seventh column (the last answer of a question wins)."""
        header, rows = read_tsv(self.question_path)
        kept = [column for column in header if column not in _SUBMISSION_DROPPED]
        columns = kept[:6] + ["prediction"] + kept[6:]
        predictions = {str(record["question_id"]): record["text"] for record in records}
        table = []
        for row in rows:
            values = {column: (None if is_missing(row[column]) else row[column]) for column in kept}
            values["index"] = _index(row["index"])
            values["prediction"] = predictions.get(str(values["index"]))
            table.append([values[column] for column in columns])
        return columns, table

    def write_outputs(self, records, questions, output_dir: Path, tag: str) -> list:
        try:
            from openpyxl import Workbook
        except ImportError:
            print(
                f"{self.title}: openpyxl is not installed, so no submission sheet was written "
                "(pip install openpyxl, then run the same command again: answers are kept).",
                file=sys.stderr,
            )
            return []
        columns, table = self.submission_rows(records)
        workbook = Workbook()
        sheet = workbook.active
        sheet.append(columns)
        for row in table:
            sheet.append(row)
        path = output_dir / f"{self.question_path.stem}_{tag}.xlsx"
        partial = path.with_name(path.name + ".partial")
        workbook.save(partial)
        partial.replace(path)
        return [path]


class MMBenchCN(MMBench):
    name, title, folder = "mmbench_cn", "MMBench-CN (dev)", "mmbench_cn"
    question_file = "mmbench_dev_cn_20231003.tsv"
    language = "cn"


# ---------------------------------------------------------------------------------------------------------------------
# SEED-Bench
# ---------------------------------------------------------------------------------------------------------------------


class SEEDBench(Benchmark):
    name, title, folder = "seed", "SEED-Bench (image)", "seed_bench"
    question_file = "llava-seed-bench.jsonl"
    image_folder = None  # image paths are relative to the benchmark folder
    annotation_file = "SEED-Bench.json"
    scoring = "local: accuracy, image and per question type (SEED-Bench.json)"

    def write_outputs(self, records, questions, output_dir: Path, tag: str) -> list:
        """The upload file of LLaVA's `convert_seed_for_submission.py`: one line per question of SEED-Bench.json, in
        its order, with its (string) `question_id`; written once every one of them is answered."""
        path = self.root / self.annotation_file
        if not path.is_file():
            print(f"{self.title}: {path} not found, so no upload file was written.", file=sys.stderr)
            return []
        answers = {str(record["question_id"]): record["text"] for record in records}
        question_ids = [question["question_id"] for question in read_json(path)["questions"]]
        missing = [question_id for question_id in question_ids if str(question_id) not in answers]
        if missing:
            print(
                f"{self.title}: {len(missing)} questions of {path.name} are unanswered (e.g. {missing[0]!r}), so no "
                "upload file was written: run the same command again to answer them.",
                file=sys.stderr,
            )
            return []
        lines = [
            json.dumps({"question_id": question_id, "prediction": answers[str(question_id)]})
            for question_id in question_ids
        ]
        return [write_lines(output_dir / f"seed_bench_{tag}.jsonl", lines)]

    def score(self, records, questions) -> dict | None:
        path = self.root / self.annotation_file
        if not path.is_file() or not records:
            return None
        data = read_json(path)
        type_names = {type_id: name for name, type_id in data["question_type"].items()}
        answers = {record["question_id"]: record["text"] for record in records}

        def accuracy(data_type: str | None) -> tuple[float, dict]:
            counts, correct = defaultdict(int), defaultdict(int)
            for question in data["questions"]:
                if data_type is not None and question["data_type"] != data_type:
                    continue
                question_type = question["question_type_id"]
                counts[question_type] += 1
                # the reference looks answers up by the integer id where the id is an integer
                question_id = question["question_id"]
                try:
                    question_id = int(question_id)
                except ValueError:
                    pass
                correct[question_type] += answers.get(question_id) == question["answer"]
            total = sum(counts.values())
            per_type = {type_names.get(t, str(t)): correct[t] / counts[t] for t in sorted(counts)}
            return (sum(correct.values()) / total if total else None), per_type

        overall, per_type = accuracy(None)
        image, _ = accuracy("image")
        return {"accuracy": overall, "image_accuracy": image, "per_question_type": per_type}


__all__ = ["MMBench", "MMBenchCN", "SEEDBench", "ScienceQA", "is_missing", "scienceqa_letter"]
