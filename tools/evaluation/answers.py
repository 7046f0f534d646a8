# Copyright 2026 The llava-trim authors. Licensed under the Apache License, Version 2.0.
"""
LLaVA answer files (JSONL, one `{"question_id", "prompt", "text", "answer_id", "model_id", "metadata"}` per line):
appended one flushed line at a time, repaired after an interruption, read back to find what is still to answer
(resume), written per process as part files and merged in question-file order.
"""

import json
import os
import uuid
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ...configuration_llava_trim import parse_trim_ratio


@dataclass(frozen=True)
class Setting:
    """One TRIM mode to evaluate: its name (used in file names) and the `trim_ratio` passed to `generate`."""

    name: str
    trim_ratio: float | None

    @classmethod
    def from_text(cls, text: str) -> "Setting":
        """`"off"` -> TRIM off (`None`), `"auto"` -> `-1`, `"0.1"` -> keep 10 % of the patches."""
        trim_ratio = parse_trim_ratio(text)
        name = "off" if trim_ratio is None else "auto" if trim_ratio == -1 else f"{trim_ratio:g}"
        return cls(name, trim_ratio)


def answer_file_path(output_dir: str | Path, setting: Setting) -> Path:
    return Path(output_dir) / f"answers_{setting.name}.jsonl"


def part_file_path(output_dir: Path, setting: Setting, rank: int) -> Path:
    return output_dir / f"answers_{setting.name}.part{rank}.jsonl"


_SHORTUUID_ALPHABET = "23456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"


def new_answer_id() -> str:
    """A random 22-character id like `shortuuid.uuid()` (a UUID4 in base 57), as LLaVA's answer files use."""
    number, digits = uuid.uuid4().int, []
    for _ in range(22):
        number, digit = divmod(number, len(_SHORTUUID_ALPHABET))
        digits.append(_SHORTUUID_ALPHABET[digit])
    return "".join(reversed(digits))


class AnswerFile:
    """
    An append-only LLaVA answer file (JSONL) that survives interruption.

    Opening it reads the answers already there; a last line cut short by an interruption is removed. Every
    [`write`] appends one line and flushes it, so a killed run loses at most the answer being written.
    """

    def __init__(self, path: str | Path, repair: bool = True):
        self.path = Path(path)
        self.records: list[dict] = self._read_and_repair(repair)
        self._file = None

    def _read_and_repair(self, repair: bool) -> list[dict]:
        if not self.path.exists():
            return []
        data = self.path.read_bytes()
        *complete, tail = data.split(b"\n")
        if tail and repair:  # a line without its newline: the write was interrupted
            with open(self.path, "r+b") as file:
                file.truncate(len(data) - len(tail))
        records = []
        for line_number, line in enumerate(complete, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(
                    f"{self.path}, line {line_number} is not valid JSON ({error.msg}); fix or delete that line, "
                    "then run again to resume."
                ) from None
            if not isinstance(record, dict) or "question_id" not in record or "prompt" not in record:
                raise ValueError(f"{self.path}, line {line_number} is not a LLaVA answer record.")
            records.append(record)
        return records

    def pending(self, questions: Sequence[dict]) -> list[dict]:
        """The questions without an answer yet, in file order (a question asked twice needs two answers)."""
        return pending_questions(self.records, questions)

    def write(self, record: dict) -> None:
        """Append one answer and flush it to the operating system."""
        if self._file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "a", encoding="utf-8")
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        self.records.append(record)

    def close(self) -> None:
        if self._file is not None:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            self._file = None

    def __enter__(self) -> "AnswerFile":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


# ---------------------------------------------------------------------------------------------------------------------
# Resume: which questions an answer file already answers, and with what
# ---------------------------------------------------------------------------------------------------------------------


def question_key(question_id, text: str) -> tuple[str, str]:
    """What identifies a question in answer files: its id and its text (LLaVA's TextVQA file reuses ids per image)."""
    return json.dumps(question_id), text


def _key_of_question(question: dict) -> tuple[str, str]:
    return question_key(question["question_id"], question.get("prompt", question["text"]))


def pending_questions(records: Sequence[dict], questions: Sequence[dict]) -> list[dict]:
    """The questions without an answer in `records`, in question order (a question asked twice needs two answers)."""
    answered = Counter(question_key(record["question_id"], record["prompt"]) for record in records)
    pending = []
    for question in questions:
        key = _key_of_question(question)
        if answered[key] > 0:
            answered[key] -= 1
        else:
            pending.append(question)
    return pending


def answers_for_questions(records: Sequence[dict], questions: Sequence[dict]) -> list[dict | None]:
    """Pair answer records with questions (by id and prompt, in order of occurrence); `None` where unanswered."""
    by_key: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for record in records:
        by_key[question_key(record["question_id"], record["prompt"])].append(record)
    paired = []
    for question in questions:
        candidates = by_key.get(_key_of_question(question))
        paired.append(candidates.pop(0) if candidates else None)
    return paired


def check_answers(records: Sequence[dict], model_id: str, setting: Setting, generation: dict, output_dir: Path):
    """Refuse to resume from answers another model, another setting or other generation settings wrote.

    `generation` is what the answers depend on besides the model and the TRIM setting (`max_new_tokens`, `dtype`),
    as `answer_record` stores it in each record's `metadata`; records without it (answer files written by other
    means, such as LLaVA's own scripts) are taken as they are.
    """
    path = answer_file_path(output_dir, setting)
    for record in records:
        metadata = record.get("metadata") or {}
        written_setting = metadata.get("setting")
        if record.get("model_id") != model_id or written_setting != setting.name:
            raise ValueError(
                f"{path} (or a part file beside it) holds answers of model {record.get('model_id')!r} with setting "
                f"{written_setting!r}, not of {model_id!r} with setting {setting.name!r}. Use another --output-dir, "
                "or delete the files to start over."
            )
        written = {key: metadata[key] for key in generation if key in metadata}
        if any(generation[key] != value for key, value in written.items()):
            raise ValueError(
                f"{path} (or a part file beside it) holds answers generated with {written}, not with {generation}: "
                "rerun with the same options to resume, or use another --output-dir (or delete the files) to answer "
                "again."
            )


# ---------------------------------------------------------------------------------------------------------------------
# Part files of several processes, and their merge
# ---------------------------------------------------------------------------------------------------------------------


def read_answers(output_dir: Path, setting: Setting) -> tuple[list[dict], list[Path]]:
    """Every answer written for `setting`: the merged answer file, then the per-process part files of earlier
    (maybe interrupted) runs, whatever their number of processes. Also returns the part files' paths."""
    parts = sorted(output_dir.glob(f"answers_{setting.name}.part*.jsonl"))
    records = []
    for path in [answer_file_path(output_dir, setting), *parts]:
        records.extend(AnswerFile(path, repair=False).records)
    return records, parts


def merge_answers(output_dir: Path, setting: Setting, questions: Sequence[dict]) -> list[dict]:
    """
    Write the answer file in question-file order from every answer written so far (merged file and part files),
    then remove the part files. Answers to questions not in `questions` (an earlier run without `--limit`) are kept,
    after the others. Returns the answers to `questions`, in order.
    """
    records, parts = read_answers(output_dir, setting)
    paired = answers_for_questions(records, questions)
    ordered = [record for record in paired if record is not None]
    used = {id(record) for record in ordered}
    others = [record for record in records if id(record) not in used]
    path = answer_file_path(output_dir, setting)
    if ordered or others or path.exists():
        partial = path.with_name(path.name + ".partial")
        partial.write_text("".join(json.dumps(record) + "\n" for record in ordered + others), encoding="utf-8")
        partial.replace(path)
    for part in parts:
        part.unlink()
    return ordered
