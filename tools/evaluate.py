# Copyright 2026 The llava-trim authors. Licensed under the Apache License, Version 2.0.
"""Evaluate LLaVA-TRIM on a benchmark: answers for several TRIM modes, accuracy, kept tokens and speed.

Reads LLaVA's evaluation question files (JSONL, one object per line with `question_id`, `image`, `text` and optionally
`answer` / `answers` / `label` and `category`), answers every question once per setting (`off`: plain LLaVA-1.5,
`auto`: TRIM's IQR rule, or a fixed keep ratio such as `0.1`) with batched greedy generation, and writes:

- `answers_<setting>.jsonl`: LLaVA's answer-file format (`question_id`, `prompt`, `text`, `answer_id`, `model_id`,
  `metadata`), so LLaVA's own scorers (`eval_pope.py`, `eval_textvqa.py`, ...) read it unchanged. `metadata` records
  what TRIM kept and how long the answer took;
- `summary.json` and `summary.png`: accuracy where ground truth is known (VQA-style normalised exact match; yes/no
  accuracy, precision, recall and F1 for POPE-style questions), the distribution of kept tokens, time to first token
  and throughput, per setting.

Answers are appended and flushed one at a time; a rerun with the same output folder continues where an interrupted
run stopped and never answers a question twice.

```bash
python -m llava_trim.tools.evaluate --model path/to/llava-v1.5-7b-trim \
    --questions llava_pope_test.jsonl --image-folder coco/val2014 --annotations coco/coco_pope_*.json \
    --settings off auto 0.1 --output-dir results/pope --batch-size 8
```
"""

import argparse
import json
import math
import os
import re
import sys
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from tqdm.auto import tqdm
from transformers.generation.streamers import BaseStreamer

from ..processing_llava_trim import VICUNA_V1_SYSTEM

# ---------------------------------------------------------------------------------------------------------------------
# Settings
# ---------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Setting:
    """One TRIM mode to evaluate: its name (used in file names) and the `trim_ratio` passed to `generate`."""

    name: str
    trim_ratio: float | None


def parse_setting(text: str) -> Setting:
    """`"off"` -> TRIM off (`None`), `"auto"` -> `-1`, `"0.1"` -> keep 10 % of the patches."""
    lowered = text.strip().lower()
    if lowered in ("off", "none", "baseline"):
        return Setting("off", None)
    if lowered in ("auto", "-1"):
        return Setting("auto", -1)
    try:
        ratio = float(lowered)
    except ValueError:
        ratio = math.nan
    if not 0 < ratio <= 1:
        raise ValueError(f"{text!r} is not a TRIM setting: use 'off', 'auto' or a keep ratio in (0, 1] such as 0.1.")
    return Setting(f"{ratio:g}", ratio)


# ---------------------------------------------------------------------------------------------------------------------
# Question files, ground truth and answer files
# ---------------------------------------------------------------------------------------------------------------------


def _read_json_records(path: Path) -> list | dict:
    """The content of a JSON document, or the records of a JSON-lines file (one value per non-empty line).

    `.jsonl` files are read line by line; for others the extension does not decide (POPE's `coco_pope_*.json` files,
    for one, hold JSON lines). A lone record (an object with a `question_id`) comes back as a one-record list.
    """
    text = path.read_text(encoding="utf-8")
    if path.suffix != ".jsonl":
        try:
            document = json.loads(text)
        except json.JSONDecodeError:
            pass
        else:
            return [document] if isinstance(document, dict) and "question_id" in document else document
    records = []
    for line_number, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}, line {line_number}: not valid JSON ({error.msg}).") from None
    return records


def load_questions(path: str | Path, limit: int | None = None) -> list[dict]:
    """Read a LLaVA question file: a JSONL (or JSON list) of objects with `question_id`, `image` and `text`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Question file not found: {path}")
    questions = _read_json_records(path)
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


def question_key(question_id, text: str) -> tuple[str, str]:
    """What identifies a question in answer files: its id and its text (LLaVA's TextVQA file reuses ids per image)."""
    return json.dumps(question_id), text


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
        data = _read_json_records(path)
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

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.records: list[dict] = self._read_and_repair()
        self._file = None

    def _read_and_repair(self) -> list[dict]:
        if not self.path.exists():
            return []
        data = self.path.read_bytes()
        *complete, tail = data.split(b"\n")
        if tail:  # a line without its newline: the write was interrupted
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
        answered = Counter(question_key(record["question_id"], record["prompt"]) for record in self.records)
        pending = []
        for question in questions:
            key = question_key(question["question_id"], question["text"])
            if answered[key] > 0:
                answered[key] -= 1
            else:
                pending.append(question)
        return pending

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


def answers_for_questions(records: Sequence[dict], questions: Sequence[dict]) -> list[dict | None]:
    """Pair answer records with questions (by id and text, in order of occurrence); `None` where unanswered."""
    by_key: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for record in records:
        by_key[question_key(record["question_id"], record["prompt"])].append(record)
    paired = []
    for question in questions:
        candidates = by_key.get(question_key(question["question_id"], question["text"]))
        paired.append(candidates.pop(0) if candidates else None)
    return paired


# ---------------------------------------------------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------------------------------------------------

# VQA-style answer normalisation. "none" -> "0" as in the VQA evaluation.
_NUMBER_WORDS = {
    "none": "0",
    "zero": "0",
    "one": "1",
    "two": "2",
    "three": "3",
    "four": "4",
    "five": "5",
    "six": "6",
    "seven": "7",
    "eight": "8",
    "nine": "9",
    "ten": "10",
    "eleven": "11",
    "twelve": "12",
}
_ARTICLES = {"a", "an", "the"}


def normalize_answer(text: str) -> str:
    """
    Normalise an answer for exact-match scoring, VQA-style.

    Lowercase; drop apostrophes and the thousands separators of numbers ("1,000" -> "1000"); turn other punctuation
    into spaces, except decimal points ("3.5"); drop the articles a / an / the; number words become digits
    ("Two" -> "2"); collapse whitespace. `"The Two dogs."` -> `"2 dogs"`.
    """
    text = text.lower()
    text = re.sub(r"(?<=\d),(?=\d{3})", "", text)
    text = text.replace("'", "").replace("\u2019", "")
    text = re.sub(r"\.(?!\d)|(?<!\d)\.", " ", text)
    text = re.sub(r"[^\w\s.]|_", " ", text)
    words = [_NUMBER_WORDS.get(word, word) for word in text.split() if word not in _ARTICLES]
    return " ".join(words)


def vqa_accuracy(prediction: str, truth: str | Sequence[str]) -> float:
    """
    Accuracy of one prediction.

    Against one answer: normalised exact match (0 or 1). Against several annotators' answers (VQAv2, TextVQA): the VQA
    rule `min(1, matches / 3)`, averaged over the subsets that leave one annotator out.
    """
    predicted = normalize_answer(prediction)
    if isinstance(truth, str):
        return float(predicted == normalize_answer(truth))
    answers = [normalize_answer(answer) for answer in truth]
    if not answers:
        raise ValueError("Empty list of ground-truth answers.")
    if len(answers) == 1:
        return float(predicted == answers[0])
    matches = sum(answer == predicted for answer in answers)
    # leaving out a matching annotator leaves matches - 1 matches, leaving out another leaves all of them
    scores = [min(1.0, (matches - (answer == predicted)) / 3) for answer in answers]
    return sum(scores) / len(scores)


def parse_yes_no(text: str) -> str:
    """Read a yes/no answer as LLaVA's POPE scorer does: in the first sentence, "no" or "not" means no, else yes."""
    first_sentence = text.split(".")[0].replace(",", "")
    words = re.sub(r"[^\w\s]", " ", first_sentence.lower()).split()
    return "no" if "no" in words or "not" in words else "yes"


def yes_no_metrics(predictions: Sequence[str], labels: Sequence[str]) -> dict:
    """POPE metrics with "yes" as the positive class: accuracy, precision, recall, F1, yes ratio and the counts."""
    parsed = [parse_yes_no(prediction) for prediction in predictions]
    truths = [normalize_answer(label) for label in labels]
    tp = sum(p == "yes" and t == "yes" for p, t in zip(parsed, truths, strict=True))
    fp = sum(p == "yes" and t == "no" for p, t in zip(parsed, truths, strict=True))
    tn = sum(p == "no" and t == "no" for p, t in zip(parsed, truths, strict=True))
    fn = sum(p == "no" and t == "yes" for p, t in zip(parsed, truths, strict=True))
    total = len(parsed)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "num_questions": total,
        "accuracy": (tp + tn) / total if total else 0.0,
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "yes_ratio": parsed.count("yes") / total if total else 0.0,
        "tp": tp,
        "fp": fp,
        "tn": tn,
        "fn": fn,
    }


def _is_yes_no(truth) -> bool:
    return isinstance(truth, str) and normalize_answer(truth) in ("yes", "no")


def _distribution(values: Sequence[float], num_patches: int | None = None) -> dict:
    """Mean, spread, percentiles and (with `num_patches`) a histogram over [0, num_patches] in 24 bins."""
    tensor = torch.tensor(values, dtype=torch.float64)
    quantiles = torch.quantile(tensor, torch.tensor([0.1, 0.25, 0.5, 0.75, 0.9], dtype=torch.float64)).tolist()
    result = {
        "mean": tensor.mean().item(),
        "std": tensor.std(unbiased=False).item(),
        "min": tensor.min().item(),
        "p10": quantiles[0],
        "p25": quantiles[1],
        "median": quantiles[2],
        "p75": quantiles[3],
        "p90": quantiles[4],
        "max": tensor.max().item(),
    }
    if num_patches:
        edges = torch.linspace(0, num_patches, 25, dtype=torch.float64)
        counts = torch.histogram(tensor.clamp(0, num_patches), bins=edges).hist
        result["histogram"] = {"bin_edges": edges.tolist(), "counts": [int(count) for count in counts.tolist()]}
    return result


def summarize_setting(setting: Setting, questions: Sequence[dict], records: Sequence[dict], truths: Sequence) -> dict:
    """
    The summary of one setting's answers: counts, accuracy, yes/no metrics, kept tokens and timing.

    Only answers to `questions` count; `truths` holds the ground truth per question (`None` if unknown).
    """
    paired = answers_for_questions(records, questions)
    answered = [
        (question, record, truth) for question, record, truth in zip(questions, paired, truths, strict=True) if record
    ]
    summary: dict = {
        "setting": setting.name,
        "trim_ratio": setting.trim_ratio,
        "num_questions": len(questions),
        "num_answered": len(answered),
    }
    if not answered:
        return summary

    scored = [(question, record, truth) for question, record, truth in answered if truth is not None]
    if scored:
        scores = [vqa_accuracy(record["text"], truth) for _, record, truth in scored]
        summary["num_scored"] = len(scored)
        summary["accuracy"] = sum(scores) / len(scores)
        by_category = defaultdict(list)
        for (question, _, _), score in zip(scored, scores, strict=True):
            if "category" in question:
                by_category[str(question["category"])].append(score)
        if by_category:
            summary["accuracy_by_category"] = {name: sum(s) / len(s) for name, s in sorted(by_category.items())}

    yes_no = [(question, record, truth) for question, record, truth in scored if _is_yes_no(truth)]
    if yes_no:
        summary["yes_no"] = yes_no_metrics([r["text"] for _, r, _ in yes_no], [t for _, _, t in yes_no])
        categories = sorted({str(q["category"]) for q, _, _ in yes_no if "category" in q})
        if categories:
            summary["yes_no_by_category"] = {
                name: yes_no_metrics(
                    [r["text"] for q, r, _ in yes_no if str(q.get("category")) == name],
                    [t for q, _, t in yes_no if str(q.get("category")) == name],
                )
                for name in categories
            }

    metadata = [record.get("metadata") or {} for _, record, _ in answered]
    kept = [m["num_kept"] for m in metadata if "num_kept" in m]
    if kept:
        num_patches = max(m.get("num_patches", 0) for m in metadata)
        summary["num_patches"] = num_patches
        summary["kept_tokens"] = _distribution(kept, num_patches)
        summary["image_tokens_mean"] = sum(m["image_tokens"] for m in metadata) / len(metadata)
    timed = [m for m in metadata if "batch_seconds" in m]
    if timed:
        seconds = sum(m["batch_seconds"] / m["batch_size"] for m in timed)
        new_tokens = sum(m["num_new_tokens"] for m in timed)
        ttft = torch.tensor([m["ttft_seconds"] for m in timed], dtype=torch.float64)
        summary["timing"] = {
            "ttft_mean_s": ttft.mean().item(),
            "ttft_median_s": ttft.median().item(),
            "seconds_per_question": seconds / len(timed),
            "questions_per_second": len(timed) / seconds if seconds else None,
            "new_tokens_per_second": new_tokens / seconds if seconds else None,
            "mean_new_tokens": new_tokens / len(timed),
            "batch_size": max(m["batch_size"] for m in timed),
        }
    return summary


# ---------------------------------------------------------------------------------------------------------------------
# Model, prompts and generation
# ---------------------------------------------------------------------------------------------------------------------


def load_model_and_processor(model: str, device: str = "auto", dtype: str = "auto"):
    """
    Load a converted LLaVA-TRIM folder (or Hub id) and its processor, ready for batched generation.

    `device="auto"` picks the first GPU when there is one; `dtype="auto"` keeps the checkpoint's dtype on GPU and uses
    float32 on CPU. The tokenizer pads on the left, as generation needs.
    """
    from transformers import AutoModelForImageTextToText, AutoProcessor

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if dtype == "auto":
        torch_dtype = torch.float32 if device == "cpu" else "auto"
    else:
        torch_dtype = getattr(torch, dtype)
    loaded = AutoModelForImageTextToText.from_pretrained(
        model, trust_remote_code=True, dtype=torch_dtype, device_map={"": device}
    ).eval()
    processor = AutoProcessor.from_pretrained(model, trust_remote_code=True)
    processor.tokenizer.padding_side = "left"
    return loaded, processor


def build_prompt(processor, question: str) -> str:
    """LLaVA-1.5's one-image prompt for `question`: the processor's chat template, else LLaVA's `vicuna_v1`."""
    if getattr(processor, "chat_template", None):
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        return processor.apply_chat_template(messages, add_generation_prompt=True)
    image_token = getattr(processor, "image_token", "<image>")
    return f"{VICUNA_V1_SYSTEM} USER: {image_token}\n{question} ASSISTANT:"


class FirstTokenTimer(BaseStreamer):
    """A `generate` streamer that only records when the first new token arrives (the prompt comes first)."""

    def __init__(self):
        self.calls = 0
        self.first_token_time: float | None = None

    def put(self, value: torch.Tensor) -> None:
        self.calls += 1
        if self.calls == 2:
            self.first_token_time = time.perf_counter()

    def end(self) -> None:
        pass


def _num_new_tokens(tokens: torch.Tensor, eos_token_ids: set[int]) -> int:
    """Generated tokens of one row up to and including the first end-of-sequence token."""
    for position, token in enumerate(tokens.tolist()):
        if token in eos_token_ids:
            return position + 1
    return tokens.shape[0]


def generate_answers(
    model,
    processor,
    questions: Sequence[dict],
    images: Sequence[Image.Image],
    trim_ratio: float | None,
    max_new_tokens: int = 128,
) -> tuple[list[dict], dict]:
    """
    Answer a batch of questions (one image each) with greedy decoding.

    Returns:
        `(answers, timing)`: per question a dict with `text`, `num_kept`, `num_patches`, `image_tokens` (LLM positions
        of its image) and `num_new_tokens`; `timing` with the batch's `batch_seconds` (processor to last token) and
        `ttft_seconds` (processor to first new token).
    """
    tokenizer = processor.tokenizer
    prompts = [build_prompt(processor, question["text"]) for question in questions]
    eos = model.generation_config.eos_token_id
    eos_token_ids = set(eos if isinstance(eos, list) else [eos]) if eos is not None else {tokenizer.eos_token_id}
    pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(eos_token_ids)

    timer = FirstTokenTimer()
    start = time.perf_counter()
    inputs = processor(images=list(images), text=prompts, padding=True, return_tensors="pt").to(model.device)
    with torch.inference_mode():
        outputs = model.generate(
            **inputs,
            trim_ratio=trim_ratio,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            num_beams=1,
            pad_token_id=pad_token_id,
            return_dict_in_generate=True,
            streamer=timer,
        )
    new_tokens = outputs.sequences[:, inputs["input_ids"].shape[1] :].cpu()  # (batch, new_length)
    end = time.perf_counter()

    selection = outputs["trim_selection"]
    num_kept = selection.num_kept.tolist()
    image_tokens = selection.tokens_per_image.tolist()
    texts = tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
    answers = [
        {
            "text": text.strip(),
            "num_kept": num_kept[row],
            "num_patches": selection.num_patches,
            "image_tokens": image_tokens[row],
            "num_new_tokens": _num_new_tokens(new_tokens[row], eos_token_ids),
        }
        for row, text in enumerate(texts)
    ]
    first_token = timer.first_token_time if timer.first_token_time is not None else end
    return answers, {"batch_seconds": end - start, "ttft_seconds": first_token - start}


def _load_image(image_folder: Path, question: dict) -> Image.Image:
    path = image_folder / question["image"]
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, SyntaxError, ValueError) as error:
        raise ValueError(
            f"Cannot read the image {str(path)!r} of question_id {question['question_id']!r} ({error}). Answers "
            "written so far are kept: fix or replace the file and run again to resume."
        ) from None


def check_images(questions: Sequence[dict], image_folder: str | Path) -> None:
    """Fail early, before loading the model, when an image of the question file is missing."""
    image_folder = Path(image_folder)
    missing = [question for question in questions if not (image_folder / question["image"]).is_file()]
    if missing:
        first = missing[0]
        raise FileNotFoundError(
            f"{len(missing)} of {len(questions)} images are missing from {image_folder}, e.g. {first['image']!r} "
            f"(question_id {first['question_id']!r}). Pass the folder holding the benchmark's images as "
            "--image-folder."
        )


def answer_file_path(output_dir: str | Path, setting: Setting) -> Path:
    return Path(output_dir) / f"answers_{setting.name}.jsonl"


def check_answer_file(answer_file: AnswerFile, model_id: str, setting: Setting) -> None:
    """Refuse to resume from answers another model or another setting wrote."""
    for record in answer_file.records:
        written_setting = (record.get("metadata") or {}).get("setting")
        if record.get("model_id") != model_id or written_setting != setting.name:
            raise ValueError(
                f"{answer_file.path} holds answers of model {record.get('model_id')!r} with setting "
                f"{written_setting!r}, not of {model_id!r} with setting {setting.name!r}. Use another --output-dir, "
                "or delete the file to start over."
            )


def run_setting(
    model,
    processor,
    questions: Sequence[dict],
    image_folder: str | Path,
    setting: Setting,
    answer_file: AnswerFile,
    model_id: str,
    batch_size: int = 1,
    max_new_tokens: int = 128,
    progress: bool = True,
) -> int:
    """Answer every question of `questions` not yet in `answer_file`, batch by batch; return how many were added."""
    check_answer_file(answer_file, model_id, setting)
    pending = answer_file.pending(questions)
    image_folder = Path(image_folder)
    added = 0
    with tqdm(
        total=len(questions),
        initial=len(questions) - len(pending),
        desc=f"TRIM {setting.name}",
        unit="q",
        disable=not progress,
    ) as bar:
        for start in range(0, len(pending), batch_size):
            batch = pending[start : start + batch_size]
            images = [_load_image(image_folder, question) for question in batch]
            answers, timing = generate_answers(model, processor, batch, images, setting.trim_ratio, max_new_tokens)
            for question, answer in zip(batch, answers, strict=True):
                answer_file.write(
                    {
                        "question_id": question["question_id"],
                        "prompt": question["text"],
                        "text": answer.pop("text"),
                        "answer_id": new_answer_id(),
                        "model_id": model_id,
                        "metadata": {
                            "setting": setting.name,
                            "trim_ratio": setting.trim_ratio,
                            **answer,
                            "batch_size": len(batch),
                            "batch_seconds": timing["batch_seconds"],
                            "ttft_seconds": timing["ttft_seconds"],
                        },
                    }
                )
                added += 1
            bar.update(len(batch))
    return added


# ---------------------------------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------------------------------


def format_summary_table(summaries: Sequence[dict]) -> str:
    """A plain-text table of the per-setting summaries."""
    header = ["setting", "answered", "kept (mean)", "accuracy", "yes/no F1", "TTFT (s)", "q/s", "tokens/s"]
    rows = [header]

    def number(value, pattern="{:.3f}"):
        return "-" if value is None else pattern.format(value)

    for summary in summaries:
        timing = summary.get("timing", {})
        rows.append(
            [
                summary["setting"],
                f"{summary['num_answered']}/{summary['num_questions']}",
                number(summary.get("kept_tokens", {}).get("mean"), "{:.1f}"),
                number(summary.get("accuracy"), "{:.2%}"),
                number(summary.get("yes_no", {}).get("f1")),
                number(timing.get("ttft_mean_s")),
                number(timing.get("questions_per_second"), "{:.2f}"),
                number(timing.get("new_tokens_per_second"), "{:.1f}"),
            ]
        )
    widths = [max(len(row[column]) for row in rows) for column in range(len(header))]
    return "\n".join("  ".join(cell.rjust(width) for cell, width in zip(row, widths, strict=True)) for row in rows)


def plot_summary(summaries: Sequence[dict], path: str | Path, title: str | None = None) -> Path:
    """
    Plot accuracy and time against the mean number of kept tokens (one point per setting), and the distribution of
    kept tokens per setting, to a PNG. Uses matplotlib's Agg canvas (no display needed).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(15, 4.5), layout="constrained")
    FigureCanvasAgg(figure)
    accuracy_axis, time_axis, histogram_axis = figure.subplots(1, 3)
    plotted = [s for s in summaries if "kept_tokens" in s]

    with_accuracy = [s for s in plotted if "accuracy" in s]
    if with_accuracy:
        xs = [s["kept_tokens"]["mean"] for s in with_accuracy]
        ys = [100 * s["accuracy"] for s in with_accuracy]
        accuracy_axis.plot(xs, ys, "o", color="tab:blue", label="accuracy (normalised exact match)")
        with_f1 = [s for s in with_accuracy if "yes_no" in s]
        if with_f1:
            accuracy_axis.plot(
                [s["kept_tokens"]["mean"] for s in with_f1],
                [100 * s["yes_no"]["f1"] for s in with_f1],
                "s",
                color="tab:green",
                label="yes/no F1",
            )
        for x, y, s in zip(xs, ys, with_accuracy, strict=True):
            accuracy_axis.annotate(s["setting"], (x, y), textcoords="offset points", xytext=(4, 4))
        accuracy_axis.legend(loc="lower right")
    else:
        accuracy_axis.text(0.5, 0.5, "no ground truth", ha="center", va="center", transform=accuracy_axis.transAxes)
    accuracy_axis.set(xlabel="kept image tokens (mean)", ylabel="%", title="Accuracy")

    timed = [s for s in plotted if "timing" in s]
    if timed:
        xs = [s["kept_tokens"]["mean"] for s in timed]
        time_axis.plot(xs, [s["timing"]["ttft_mean_s"] for s in timed], "o", label="time to first token")
        time_axis.plot(xs, [s["timing"]["seconds_per_question"] for s in timed], "s", label="seconds per question")
        for x, s in zip(xs, timed, strict=True):
            time_axis.annotate(
                s["setting"], (x, s["timing"]["ttft_mean_s"]), textcoords="offset points", xytext=(4, 4)
            )
        time_axis.legend(loc="upper left")
    time_axis.set(xlabel="kept image tokens (mean)", ylabel="seconds", title="Time")

    for s in plotted:
        histogram = s["kept_tokens"].get("histogram")
        if histogram:
            histogram_axis.stairs(histogram["counts"], histogram["bin_edges"], label=s["setting"])
    if plotted:
        histogram_axis.legend(loc="upper right")
    histogram_axis.set(xlabel="kept image tokens", ylabel="questions", title="Kept tokens per image")
    if title:
        figure.suptitle(title)
    path = Path(path)
    figure.savefig(path, dpi=100)
    return path


# ---------------------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m llava_trim.tools.evaluate",
        description="Answer a LLaVA benchmark question file with TRIM off, automatic and fixed ratios; write LLaVA "
        "answer files and a summary of accuracy, kept tokens and speed. Rerun the same command to resume.",
    )
    parser.add_argument("--model", required=True, help="Converted LLaVA-TRIM folder or Hub repository id.")
    parser.add_argument("--questions", required=True, help="LLaVA question file (JSONL: question_id, image, text).")
    parser.add_argument("--image-folder", required=True, help="Folder the questions' `image` paths are relative to.")
    parser.add_argument(
        "--settings",
        nargs="+",
        default=["off", "auto"],
        help="TRIM settings, one answer file each: 'off', 'auto', or keep ratios in (0, 1]. Default: off auto.",
    )
    parser.add_argument("--output-dir", required=True, help="Folder for answer files, summary.json and summary.png.")
    parser.add_argument(
        "--annotations",
        nargs="+",
        default=[],
        help="Ground-truth files for question files without answers "
        "(e.g. POPE's coco_pope_*.json, TextVQA_0.5.1_val.json).",
    )
    parser.add_argument("--batch-size", type=int, default=1, help="Questions per generate call (default 1).")
    parser.add_argument("--max-new-tokens", type=int, default=128, help="Answer length limit (LLaVA's default: 128).")
    parser.add_argument("--limit", type=int, default=None, help="Only the first N questions (a quick check).")
    parser.add_argument("--model-id", default=None, help="`model_id` in the answer files (default: the model's name).")
    parser.add_argument("--device", default="auto", help="'auto' (GPU if available), 'cpu', 'cuda', 'cuda:1', ...")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"])
    parser.add_argument("--no-progress", action="store_true", help="No progress bars.")
    return parser.parse_args(argv)


def evaluate(args: argparse.Namespace) -> dict:
    """Run (or resume) the evaluation described by parsed command-line `args`; return the summary it writes."""
    if args.batch_size < 1 or args.max_new_tokens < 1 or (args.limit is not None and args.limit < 1):
        raise ValueError("--batch-size, --max-new-tokens and --limit must be at least 1.")
    settings = [parse_setting(text) for text in args.settings]
    names = [setting.name for setting in settings]
    if len(set(names)) != len(names):
        raise ValueError(f"--settings names a setting twice: {names}.")
    questions = load_questions(args.questions, args.limit)
    check_images(questions, args.image_folder)
    truths = load_ground_truth(args.annotations, questions)
    model_id = args.model_id or Path(str(args.model).rstrip("/")).name
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)

    answer_files = {setting.name: AnswerFile(answer_file_path(output_dir, setting)) for setting in settings}
    for setting in settings:
        check_answer_file(answer_files[setting.name], model_id, setting)
    model = processor = None
    try:
        for setting in settings:
            answer_file = answer_files[setting.name]
            pending = answer_file.pending(questions)
            if pending and model is None:
                model, processor = load_model_and_processor(args.model, args.device, args.dtype)
                # one untimed call first, so that one-off start-up costs (kernels, caches) stay out of the timings
                image = _load_image(Path(args.image_folder), pending[0])
                generate_answers(model, processor, pending[:1], [image], setting.trim_ratio, max_new_tokens=2)
            run_setting(
                model,
                processor,
                questions,
                args.image_folder,
                setting,
                answer_file,
                model_id,
                batch_size=args.batch_size,
                max_new_tokens=args.max_new_tokens,
                progress=not args.no_progress,
            )
    finally:
        for answer_file in answer_files.values():
            answer_file.close()

    summaries = [summarize_setting(s, questions, answer_files[s.name].records, truths) for s in settings]
    summary = {
        "model": str(args.model),
        "model_id": model_id,
        "questions": str(args.questions),
        "num_questions": len(questions),
        "num_with_ground_truth": sum(truth is not None for truth in truths),
        "batch_size": args.batch_size,
        "max_new_tokens": args.max_new_tokens,
        "answer_files": {name: str(answer_files[name].path) for name in names},
        "settings": summaries,
    }
    (output_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    try:
        plot_summary(summaries, output_dir / "summary.png", title=f"{model_id} on {Path(args.questions).name}")
    except ImportError:
        print("matplotlib is not installed: no plot (pip install 'llava-trim[plot]').", file=sys.stderr)
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; see `--help`."""
    args = parse_args(argv)
    try:
        summary = evaluate(args)
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\nInterrupted. The answers written so far are in {args.output_dir}: run the same command to resume.")
        return 130
    print(format_summary_table(summary["settings"]))
    print(f"Wrote {args.output_dir}/summary.json and summary.png")
    return 0


__all__ = [
    "AnswerFile",
    "Setting",
    "evaluate",
    "load_ground_truth",
    "load_questions",
    "normalize_answer",
    "parse_setting",
    "parse_yes_no",
    "summarize_setting",
    "vqa_accuracy",
    "yes_no_metrics",
]


if __name__ == "__main__":
    sys.exit(main())
