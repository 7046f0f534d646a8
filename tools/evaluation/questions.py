# Copyright 2026 The llava-trim authors. Licensed under the Apache License, Version 2.0.
"""LLaVA question files (`question_id`, `image`, `text`), their ground truth, and the image of each question."""

import json
from collections.abc import Iterable, Sequence
from pathlib import Path

from PIL import Image

from ...processing_llava_trim import _open_image_source
from .tasks.common import read_jsonl


def read_json_records(path: Path) -> list | dict:
    """The content of a JSON document, or the records of a JSON-lines file (one value per non-empty line).

    `.jsonl` files are read line by line; for others the extension does not decide (POPE's `coco_pope_*.json` files,
    for one, hold JSON lines). A lone record (an object with a `question_id`) comes back as a one-record list.
    """
    if path.suffix != ".jsonl":
        try:
            document = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            pass
        else:
            return [document] if isinstance(document, dict) and "question_id" in document else document
    return read_jsonl(path)


def load_questions(path: str | Path, limit: int | None = None) -> list[dict]:
    """Read a LLaVA question file: a JSONL (or JSON list) of objects with `question_id`, `image` and `text`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Question file not found: {path}")
    questions = read_json_records(path)
    if not isinstance(questions, list):
        raise ValueError(f"{path}: expected one question object per line (JSONL) or a JSON list of them.")
    for number, question in enumerate(questions, start=1):
        missing = [
            key for key in ("question_id", "image", "text") if not isinstance(question, dict) or key not in question
        ]
        if missing:
            raise ValueError(
                f"{path}: question {number} lacks {', '.join(missing)}. LLaVA question files hold objects like "
                '{"question_id": 1, "image": "COCO_val2014_000000000042.jpg", "text": "Is there a dog?"}.'
            )
    return questions[:limit] if limit is not None else questions


def _answers_of(record: dict) -> str | list[str] | None:
    """Ground truth of a record: `answer` (string), `answers` (VQA: strings or `{"answer": ...}`) or `label` (POPE)."""
    for field in ("answer", "answers", "label"):
        value = record.get(field)
        if value is None:
            continue
        if isinstance(value, list):
            return [str(item["answer"]) if isinstance(item, dict) else str(item) for item in value]
        return str(value)
    return None


def _first_line(text: str) -> str:
    return text.strip().split("\n")[0].strip().lower()


def _image_key(record: dict) -> str | None:
    for field in ("image", "image_id", "imageId"):
        if record.get(field) is not None:
            return Path(str(record[field])).stem
    return None


def load_ground_truth(paths: Iterable[str | Path], questions: Sequence[dict]) -> list[str | list[str] | None]:
    """
    The ground truth of every question: from the question itself, else from annotation files.

    Annotation files may be JSONL or JSON: a list of records, `{"data": [...]}` (TextVQA), `{"annotations": [...]}`
    (VQAv2) or `{question_id: record}` (GQA). A record holding an image (`image`, `image_id` or `imageId`) and a
    question (`text` or `question`) is matched to the question with the same image file stem and the same first line
    of text (case-insensitive), as LLaVA's POPE and TextVQA scorers do; any other record is matched by `question_id`.

    Returns:
        `list`: per question, a string, a list of strings (several annotators), or `None` when unknown.
    """
    by_pair: dict[tuple[str, str], str | list[str]] = {}
    by_id: dict[str, str | list[str]] = {}
    for path in paths:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"Annotation file not found: {path}")
        data = read_json_records(path)
        if isinstance(data, dict):
            for container in ("data", "annotations", "questions"):
                if isinstance(data.get(container), list):
                    data = data[container]
                    break
            else:
                data = [{"question_id": key, **value} for key, value in data.items() if isinstance(value, dict)]
        for record in data:
            answers = _answers_of(record)
            if answers is None:
                continue
            image, text = _image_key(record), record.get("text", record.get("question"))
            if image is not None and isinstance(text, str):
                by_pair[(image, _first_line(text))] = answers
            elif "question_id" in record:
                by_id[str(record["question_id"])] = answers

    truths = []
    for question in questions:
        truth = _answers_of(question)
        if truth is None:
            truth = by_pair.get((_image_key(question), _first_line(question["text"])))
        if truth is None:
            truth = by_id.get(str(question["question_id"]))
        truths.append(truth)
    return truths


# ---------------------------------------------------------------------------------------------------------------------
# Images
# ---------------------------------------------------------------------------------------------------------------------


def has_image(question: dict) -> bool:
    return question.get("image_path") is not None or question.get("image_base64") is not None


def check_images(questions: Sequence[dict]) -> None:
    """Fail early, before loading the model, when an image file of the questions is missing."""
    missing = [q for q in questions if q.get("image_path") is not None and not Path(q["image_path"]).is_file()]
    if missing:
        first = missing[0]
        raise FileNotFoundError(
            f"{len(missing)} of {len(questions)} images are missing, e.g. {str(first['image_path'])!r} "
            f"(question_id {first['question_id']!r}). Pass the folder holding the benchmark's images as "
            "--image-folder (or put them where LLaVA's docs/Evaluation.md says, under --data-root)."
        )


def question_image(question: dict) -> Image.Image | None:
    """
    The question's image (a file, or MMBench's base64 cell) as RGB; `None` for a text-only question.

    The file is decoded by the processor's reader (`processing_llava_trim`), then converted to RGB as LLaVA's
    evaluation scripts do (`Image.open(...).convert("RGB")`: no EXIF rotation, transparency dropped rather than
    composited), so that the answers stay those of LLaVA's own scripts.
    """
    if question.get("image_base64") is not None:
        source, name = question["image_base64"], "its base64 image"
    elif question.get("image_path") is not None:
        source, name = str(question["image_path"]), repr(str(question["image_path"]))
    else:
        return None
    try:
        return _open_image_source(source).convert("RGB")
    except (OSError, ValueError) as error:
        raise ValueError(
            f"Cannot read the image {name} of question_id {question['question_id']!r} ({error}). Answers "
            "written so far are kept: fix or replace the file and run again to resume."
        ) from None
