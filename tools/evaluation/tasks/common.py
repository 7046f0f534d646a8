# Copyright 2026 The llava-trim authors. Licensed under the Apache License, Version 2.0.
"""What every benchmark shares: the question records, reading LLaVA's files, and the `Benchmark` base class.

A question, as the evaluation loop sees it, is a dict with:

- `question_id`: the id the benchmark's scorer matches answers by;
- `text`: the user turn that follows the image (LLaVA puts the image first, then `"\n"`, then this text);
- `prompt`: what LLaVA writes as the answer record's `prompt` (usually `text`; ScienceQA adds `"<image>\n"`);
- `image_path` (a file), `image_base64` (MMBench's TSV) or neither (ScienceQA's text-only questions);
- `answer_fields`: extra fields LLaVA's answer records carry for this benchmark (MMBench's options), if any;
- anything else the benchmark's scorer needs (`category`, ...).
"""

import json
from collections.abc import Sequence
from pathlib import Path


def read_jsonl(path: Path) -> list[dict]:
    """The records of a JSON-lines file, with the line number in the error for a broken line."""
    records = []
    with open(path, encoding="utf-8") as file:
        for line_number, line in enumerate(file, start=1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as error:
                    raise ValueError(f"{path}, line {line_number}: not valid JSON ({error.msg}).") from None
    return records


def read_json(path: Path):
    with open(path, encoding="utf-8") as file:
        return json.load(file)


def write_json(path: Path, value, indent: int | None = None) -> Path:
    """Write `value` as JSON through a temporary file, so a failure never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(value, indent=indent, ensure_ascii=False) + "\n", encoding="utf-8")
    partial.replace(path)
    return path


def write_lines(path: Path, lines: Sequence[str]) -> Path:
    """Write text lines (each ending in a newline) through a temporary file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    partial.replace(path)
    return path


def require_fields(path: Path, records: Sequence, fields: Sequence[str]) -> None:
    """Refuse records that lack the fields LLaVA's files have, naming the first one and what it misses."""
    for number, record in enumerate(records, start=1):
        missing = [field for field in fields if not isinstance(record, dict) or field not in record]
        if missing:
            raise ValueError(
                f"{path}: record {number} lacks {', '.join(missing)}. Is this the file of LLaVA's evaluation data "
                "(docs/Evaluation.md, eval.zip unpacked into playground/data/eval)?"
            )


class Benchmark:
    """
    One benchmark as LLaVA-1.5 evaluates it: where its files lie under `playground/data/eval`, how its questions are
    asked, what its official scorer or server takes, and (where ground truth ships) its score.

    Subclasses set the class attributes and override `load_questions`, `write_outputs` and `score` as needed.
    """

    name: str = ""
    title: str = ""
    folder: str = ""  # under the data root
    question_file: str = ""  # under `folder`
    image_folder: str | None = None  # under `folder`
    max_new_tokens: int = 128  # LLaVA's `model_vqa_loader` default; 1024 for `model_vqa`, science and MMBench
    scoring: str = "answer file only"  # how the numbers are obtained, for the docs and the summary

    def __init__(self, data_root: str | Path):
        self.root = Path(data_root) / self.folder

    @property
    def question_path(self) -> Path:
        return self.root / self.question_file

    def is_present(self) -> bool:
        return self.question_path.is_file()

    def check_present(self) -> None:
        if not self.is_present():
            raise FileNotFoundError(
                f"{self.title}: question file {self.question_path} not found. Unpack LLaVA's eval.zip into the data "
                "root (--data-root, default playground/data/eval) and add the benchmark's images as LLaVA's "
                "docs/Evaluation.md describes."
            )

    def load_questions(self) -> list[dict]:
        """LLaVA's `model_vqa_loader` / `model_vqa`: the question file's `text` is the user turn, as it is."""
        self.check_present()
        records = read_jsonl(self.question_path)
        require_fields(self.question_path, records, ("question_id", "image", "text"))
        image_folder = self.root / self.image_folder if self.image_folder else self.root
        return [
            {**record, "prompt": record["text"], "image_path": image_folder / record["image"]} for record in records
        ]

    def write_outputs(self, records: Sequence[dict], questions: Sequence[dict], output_dir: Path, tag: str) -> list:
        """Write what the benchmark's official scorer or server takes; return the paths written."""
        return []

    def score(self, records: Sequence[dict], questions: Sequence[dict]) -> dict | None:
        """The benchmark's own score of the answer records, where its ground truth is on disk; else `None`."""
        return None
