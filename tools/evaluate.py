# Copyright 2026 The llava-trim authors. Licensed under the Apache License, Version 2.0.
"""Evaluate LLaVA-TRIM on LLaVA-1.5's benchmarks: answers for several TRIM modes, scores, kept tokens and speed.

Two ways to name the questions:

- `--benchmark NAME ...` (or `all`): the TRIM paper's 12 benchmarks as LLaVA-1.5 evaluates them, read from LLaVA's
  `playground/data/eval` layout (see `llava_trim.tools.benchmarks`): the same prompts, LLaVA's answer files, each
  benchmark's submission or scorer files, and local scores where the ground truth ships;
- `--questions FILE --image-folder DIR`: any LLaVA question file (JSONL with `question_id`, `image`, `text` and
  optionally `answer` / `answers` / `label` and `category`), scored with the VQA rule where ground truth is given.

Every question is answered once per setting (`off`: plain LLaVA-1.5, `auto`: TRIM's IQR rule, or a fixed keep ratio
such as `0.1`) with batched greedy generation. Written per setting: `answers_<setting>.jsonl` (LLaVA's answer-file
format, in question-file order; `metadata` records what TRIM kept and how long the answer took), plus `summary.json`
and `summary.png` (scores, the distribution of kept tokens, time to first token, throughput).

Under `torchrun --nproc_per_node N -m llava_trim.tools.evaluate ...` (or `accelerate launch --multi_gpu
--num_processes N -m ...`, with `--nnodes` for several machines) each process loads the model on its own device and
answers a contiguous share of the questions into its own part file; the first process merges them. Answers are
flushed one at a time: a rerun with the same output folder (any number of processes) answers only what is missing.

```bash
python -m llava_trim.tools.evaluate --model path/to/llava-v1.5-7b-trim --benchmark pope mme \
    --settings off auto 0.1 --output-dir results --batch-size 8
```
"""

import argparse
import base64
import io
import json
import math
import os
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

from .benchmarks import BENCHMARKS, Benchmark, get_benchmarks
from .benchmarks.vqa import normalize_vqa_answer, vqa_score
from .benchmarks.yes_no import pope_answer
from .loading import load_model_and_processor

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


# ---------------------------------------------------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------------------------------------------------


def normalize_answer(text: str) -> str:
    """Normalise an answer as the VQA / EvalAI evaluation does (see `benchmarks.vqa.normalize_vqa_answer`)."""
    return normalize_vqa_answer(text)


def vqa_accuracy(prediction: str, truth: str | Sequence[str]) -> float:
    """
    Accuracy of one prediction, with the VQA / EvalAI answer normalisation.

    Against one answer: exact match after normalisation (0 or 1). Against several annotators' answers (VQAv2,
    TextVQA): the VQA rule `min(1, matches / 3)`, averaged over the subsets that leave one annotator out.
    """
    if isinstance(truth, str) or len(truth) == 1:
        truth = truth if isinstance(truth, str) else truth[0]
        return float(normalize_vqa_answer(prediction) == normalize_vqa_answer(truth))
    if not truth:
        raise ValueError("Empty list of ground-truth answers.")
    return vqa_score(prediction, truth)


def parse_yes_no(text: str) -> str:
    """Read a yes/no answer as LLaVA's POPE scorer does (see `benchmarks.yes_no.pope_answer`)."""
    return pope_answer(text)


def yes_no_metrics(predictions: Sequence[str], labels: Sequence[str]) -> dict:
    """POPE metrics with "yes" as the positive class: accuracy, precision, recall, F1, yes ratio and the counts."""
    parsed = [parse_yes_no(prediction) for prediction in predictions]
    truths = ["no" if normalize_answer(label) == "no" else "yes" for label in labels]
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
        summary["image_tokens_mean"] = sum(m["image_tokens"] for m in metadata if "num_kept" in m) / len(kept)
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


def build_prompt(processor, question: str, with_image: bool = True) -> str:
    """LLaVA-1.5's prompt for one question: the image (if any), then the question, in the processor's chat template
    (LLaVA's `vicuna_v1` conversation)."""
    if not getattr(processor, "chat_template", None):
        raise ValueError(
            "The processor has no chat template, so LLaVA-1.5's prompt cannot be built. Convert the checkpoint with "
            "llava_trim's convert_checkpoint.py, which saves the vicuna_v1 template with the processor."
        )
    content = ([{"type": "image"}] if with_image else []) + [{"type": "text", "text": question}]
    return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)


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
    images: Sequence[Image.Image] | None,
    trim_ratio: float | None,
    max_new_tokens: int = 128,
) -> tuple[list[dict], dict]:
    """
    Answer a batch of questions with greedy decoding: one image each, or (`images=None`) text only.

    Returns:
        `(answers, timing)`: per question a dict with `text`, `num_kept`, `num_patches`, `image_tokens` (LLM positions
        of its image; absent for text-only questions) and `num_new_tokens`; `timing` with the batch's
        `batch_seconds` (processor to last token) and `ttft_seconds` (processor to first new token).
    """
    tokenizer = processor.tokenizer
    prompts = [build_prompt(processor, question["text"], with_image=images is not None) for question in questions]
    eos = model.generation_config.eos_token_id
    eos_token_ids = set(eos if isinstance(eos, list) else [eos]) if eos is not None else {tokenizer.eos_token_id}
    pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(eos_token_ids)

    timer = FirstTokenTimer()
    start = time.perf_counter()
    image_kwargs = {"images": list(images)} if images is not None else {}
    inputs = processor(text=prompts, padding=True, return_tensors="pt", **image_kwargs).to(model.device)
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

    texts = tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
    answers = [
        {"text": text.strip(), "num_new_tokens": _num_new_tokens(new_tokens[row], eos_token_ids)}
        for row, text in enumerate(texts)
    ]
    selection = outputs.get("trim_selection") if images is not None else None
    if selection is not None:
        num_kept, image_tokens = selection.num_kept.tolist(), selection.tokens_per_image.tolist()
        candidates = selection.candidates_per_image.tolist()  # 576 for LLaVA-1.5; per image for LLaVA-NeXT
        for row, answer in enumerate(answers):
            answer.update(num_kept=num_kept[row], num_patches=candidates[row], image_tokens=image_tokens[row])
    first_token = timer.first_token_time if timer.first_token_time is not None else end
    return answers, {"batch_seconds": end - start, "ttft_seconds": first_token - start}


def _load_image(question: dict) -> Image.Image | None:
    """The question's image (a file, or MMBench's base64 cell), as RGB; `None` for a text-only question."""
    if question.get("image_base64") is not None:
        source, name = io.BytesIO(base64.b64decode(question["image_base64"])), "its base64 image"
    elif question.get("image_path") is not None:
        source, name = question["image_path"], repr(str(question["image_path"]))
    else:
        return None
    try:
        with Image.open(source) as image:
            return image.convert("RGB")
    except (OSError, SyntaxError, ValueError) as error:
        raise ValueError(
            f"Cannot read the image {name} of question_id {question['question_id']!r} ({error}). Answers "
            "written so far are kept: fix or replace the file and run again to resume."
        ) from None


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


def answer_file_path(output_dir: str | Path, setting: Setting) -> Path:
    return Path(output_dir) / f"answers_{setting.name}.jsonl"


def answer_record(question: dict, answer: dict, setting: Setting, model_id: str, timing: dict, batch: int) -> dict:
    """One line of a LLaVA answer file: `question_id`, `prompt`, `text`, the benchmark's extra fields (MMBench's
    `round_id`, `options`, `option_char`), `answer_id`, `model_id` and our `metadata`."""
    extra = dict(question.get("answer_fields") or {})
    record = {"question_id": question["question_id"]}
    if "round_id" in extra:
        record["round_id"] = extra.pop("round_id")
    record.update(prompt=question["prompt"], text=answer.pop("text"), **extra)
    record.update(
        answer_id=new_answer_id(),
        model_id=model_id,
        metadata={
            "setting": setting.name,
            "trim_ratio": setting.trim_ratio,
            **answer,
            "batch_size": batch,
            "batch_seconds": timing["batch_seconds"],
            "ttft_seconds": timing["ttft_seconds"],
        },
    )
    return record


def batches(questions: Sequence[dict], batch_size: int) -> Iterable[list[dict]]:
    """Consecutive questions in batches of at most `batch_size`; image and text-only questions never share one."""
    batch: list[dict] = []
    for question in questions:
        with_image = _has_image(question)
        if batch and (len(batch) == batch_size or _has_image(batch[0]) != with_image):
            yield batch
            batch = []
        batch.append(question)
    if batch:
        yield batch


def _has_image(question: dict) -> bool:
    return question.get("image_path") is not None or question.get("image_base64") is not None


def run_setting(
    model,
    processor,
    questions: Sequence[dict],
    setting: Setting,
    answer_file: AnswerFile,
    model_id: str,
    batch_size: int = 1,
    max_new_tokens: int = 128,
    progress: bool = True,
) -> int:
    """Answer every question of `questions` (in order), batch by batch, into `answer_file`; return how many."""
    added = 0
    with tqdm(total=len(questions), desc=f"TRIM {setting.name}", unit="q", disable=not progress) as bar:
        for batch in batches(questions, batch_size):
            images = [_load_image(question) for question in batch] if _has_image(batch[0]) else None
            answers, timing = generate_answers(model, processor, batch, images, setting.trim_ratio, max_new_tokens)
            for question, answer in zip(batch, answers, strict=True):
                answer_file.write(answer_record(question, answer, setting, model_id, timing, len(batch)))
                added += 1
            bar.update(len(batch))
    return added


# ---------------------------------------------------------------------------------------------------------------------
# Processes: one model per process, the questions split between them
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class Processes:
    """This process's place among those `torchrun` / `accelerate launch` started (rank 0 of 1 without a launcher)."""

    rank: int = 0
    world_size: int = 1
    device: str = "auto"
    state: object = None  # accelerate's PartialState when several processes run

    def wait_for_everyone(self) -> None:
        if self.state is not None:
            self.state.wait_for_everyone()

    def my_share(self, questions: Sequence[dict]) -> list[dict]:
        """This process's contiguous share of `questions` (LLaVA's `--num-chunks` / `--chunk-idx` split)."""
        size = math.ceil(len(questions) / self.world_size) if questions else 0
        return list(questions[self.rank * size : (self.rank + 1) * size])


def start_processes(device: str = "auto") -> Processes:
    """
    Join the processes a launcher started (`WORLD_SIZE` > 1): one process group (NCCL on GPUs, Gloo on CPUs), each
    process on its own device (`cuda:<local rank>`, or the CPU). Alone, nothing is set up.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return Processes(device=device)
    from accelerate import PartialState

    on_cpu = device == "cpu" or (device in ("auto", "cuda") and not torch.cuda.is_available())
    if not on_cpu and device not in ("auto", "cuda"):
        raise ValueError(
            f"--device {device} names one device, but {world_size} processes run: leave --device at 'auto' (each "
            "process takes the GPU of its local rank) or pass 'cpu'."
        )
    state = PartialState(cpu=on_cpu)  # without cpu=True, a CPU-only process would run alone as "rank 0 of 1"
    if state.num_processes != world_size:
        raise RuntimeError(
            f"The launcher started {world_size} processes but this one joined a group of {state.num_processes}: "
            "launch with torchrun, or with accelerate launch --multi_gpu --num_processes N."
        )
    return Processes(state.process_index, state.num_processes, "cpu" if on_cpu else str(state.device), state)


def part_file_path(output_dir: Path, setting: Setting, rank: int) -> Path:
    return output_dir / f"answers_{setting.name}.part{rank}.jsonl"


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
        description="Answer LLaVA-1.5's benchmarks (or any LLaVA question file) with TRIM off, automatic and fixed "
        "ratios; write LLaVA answer files, each benchmark's submission or scorer files, and a summary of scores, "
        "kept tokens and speed. Rerun the same command to resume. Under torchrun or accelerate launch the questions "
        "are split over the processes.",
    )
    parser.add_argument("--model", required=True, help="Converted LLaVA-TRIM folder or Hub repository id.")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--benchmark",
        nargs="+",
        metavar="NAME",
        help=f"LLaVA-1.5 benchmarks to run, in LLaVA's playground/data/eval layout: {', '.join(BENCHMARKS)}, or "
        "'all' (every one whose data is under --data-root).",
    )
    source.add_argument("--questions", help="A LLaVA question file (JSONL: question_id, image, text).")
    parser.add_argument(
        "--data-root", default="playground/data/eval", help="LLaVA's eval.zip, unpacked (with --benchmark)."
    )
    parser.add_argument("--image-folder", help="Folder the questions' `image` paths are relative to (--questions).")
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
        help="Ground-truth files for a question file without answers "
        "(e.g. POPE's coco_pope_*.json, TextVQA_0.5.1_val.json).",
    )
    parser.add_argument("--batch-size", type=int, default=1, help="Questions per generate call (default 1).")
    parser.add_argument(
        "--max-new-tokens",
        type=int,
        default=None,
        help="Answer length limit (default: what LLaVA uses for the benchmark, 128 or 1024; 128 for --questions).",
    )
    parser.add_argument("--limit", type=int, default=None, help="Only the first N questions (a quick check).")
    parser.add_argument("--model-id", default=None, help="`model_id` in the answer files (default: the model's name).")
    parser.add_argument("--device", default="auto", help="'auto' (GPU if available), 'cpu', 'cuda', 'cuda:1', ...")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"])
    parser.add_argument("--no-progress", action="store_true", help="No progress bars.")
    parser.add_argument("--no-plot", action="store_true", help="No summary.png.")
    return parser.parse_args(argv)


@dataclass
class Task:
    """One question set to answer: a benchmark's, or a plain question file's (then `benchmark` is `None`)."""

    name: str
    questions: list[dict]
    output_dir: Path
    truths: list
    max_new_tokens: int
    benchmark: Benchmark | None = None


def _tasks(args: argparse.Namespace) -> list[Task]:
    output_dir = Path(args.output_dir)
    if args.benchmark:
        if args.image_folder or args.annotations:
            raise ValueError(
                "--image-folder and --annotations go with --questions: a --benchmark finds its images and ground "
                "truth under --data-root."
            )
        tasks = []
        for benchmark in get_benchmarks(args.benchmark, args.data_root):
            questions = benchmark.load_questions()[: args.limit]
            tasks.append(
                Task(
                    benchmark.name,
                    questions,
                    output_dir / benchmark.name,
                    [None] * len(questions),
                    args.max_new_tokens or benchmark.max_new_tokens,
                    benchmark,
                )
            )
        return tasks
    if not args.image_folder:
        raise ValueError("--questions needs --image-folder, the folder its `image` paths are relative to.")
    questions = load_questions(args.questions, args.limit)
    image_folder = Path(args.image_folder)
    questions = [{**q, "prompt": q["text"], "image_path": image_folder / q["image"]} for q in questions]
    truths = load_ground_truth(args.annotations, questions)
    return [Task(Path(args.questions).name, questions, output_dir, truths, args.max_new_tokens or 128)]


def evaluate(args: argparse.Namespace) -> list[dict]:
    """
    Run (or resume) the evaluation described by parsed command-line `args`; return the summaries written (one per
    benchmark; empty in every process but the first when several run).
    """
    if args.batch_size < 1 or (args.max_new_tokens is not None and args.max_new_tokens < 1):
        raise ValueError("--batch-size and --max-new-tokens must be at least 1.")
    if args.limit is not None and args.limit < 1:
        raise ValueError("--limit must be at least 1.")
    settings = [parse_setting(text) for text in args.settings]
    names = [setting.name for setting in settings]
    if len(set(names)) != len(names):
        raise ValueError(f"--settings names a setting twice: {names}.")
    tasks = _tasks(args)
    for task in tasks:
        check_images(task.questions)
    processes = start_processes(args.device)
    model_id = args.model_id or Path(str(args.model).rstrip("/")).name
    loaded: list = []

    def model_and_processor(warm_up_with: dict):
        if not loaded:
            model, processor = load_model_and_processor(args.model, processes.device, args.dtype)
            # one untimed call first, so that one-off start-up costs (kernels, caches) stay out of the timings
            image = _load_image(warm_up_with)
            generate_answers(model, processor, [warm_up_with], None if image is None else [image], -1, 2)
            loaded.extend((model, processor))
        return loaded

    summaries = []
    for task in tasks:
        task.output_dir.mkdir(parents=True, exist_ok=True)
        for setting in settings:
            answer_setting(task, setting, processes, model_and_processor, model_id, args)
        processes.wait_for_everyone()
        if processes.rank == 0:
            summaries.append(summarize_task(task, settings, model_id, args))
    return summaries


def answer_setting(task: Task, setting: Setting, processes: Processes, model_and_processor, model_id: str, args):
    """Answer the questions of `task` not yet answered with `setting`, this process its share, then merge (first
    process) every answer into the answer file, in question order."""
    processes.wait_for_everyone()  # every process reads the same answers ...
    records, _ = read_answers(task.output_dir, setting)
    check_answers(records, model_id, setting, task.output_dir)
    pending = pending_questions(records, task.questions)
    processes.wait_for_everyone()  # ... before any writes
    mine = processes.my_share(pending)
    if processes.world_size > 1:
        print(
            f"[process {processes.rank} of {processes.world_size}] {task.name}, TRIM {setting.name}: answering "
            f"{len(mine)} of the {len(pending)} unanswered questions on {processes.device}",
            file=sys.stderr,
            flush=True,
        )
    try:
        if mine:
            model, processor = model_and_processor(warm_up_with=mine[0])
            with AnswerFile(part_file_path(task.output_dir, setting, processes.rank)) as part:
                run_setting(
                    model,
                    processor,
                    mine,
                    setting,
                    part,
                    model_id,
                    batch_size=args.batch_size,
                    max_new_tokens=task.max_new_tokens,
                    progress=not args.no_progress,
                )
    except KeyboardInterrupt:
        if processes.world_size == 1:  # alone, the answers so far can be merged safely
            merge_answers(task.output_dir, setting, task.questions)
        raise
    processes.wait_for_everyone()
    if processes.rank == 0:
        merge_answers(task.output_dir, setting, task.questions)


def check_answers(records: Sequence[dict], model_id: str, setting: Setting, output_dir: Path) -> None:
    """Refuse to resume from answers another model or another setting wrote."""
    for record in records:
        written_setting = (record.get("metadata") or {}).get("setting")
        if record.get("model_id") != model_id or written_setting != setting.name:
            raise ValueError(
                f"{answer_file_path(output_dir, setting)} (or a part file beside it) holds answers of model "
                f"{record.get('model_id')!r} with setting {written_setting!r}, not of {model_id!r} with setting "
                f"{setting.name!r}. Use another --output-dir, or delete the files to start over."
            )


def summarize_task(task: Task, settings: Sequence[Setting], model_id: str, args: argparse.Namespace) -> dict:
    """Score every setting's answers, write the benchmark's official files, `summary.json` and `summary.png`."""
    summaries = []
    for setting in settings:
        path = answer_file_path(task.output_dir, setting)
        records = AnswerFile(path).records if path.exists() else []
        summary = summarize_setting(setting, task.questions, records, task.truths)
        if task.benchmark is not None:
            answered = [record for record in answers_for_questions(records, task.questions) if record is not None]
            summary["scoring"] = task.benchmark.scoring
            summary["score"] = task.benchmark.score(answered, task.questions) if answered else None
            written = task.benchmark.write_outputs(answered, task.questions, task.output_dir, setting.name)
            summary["official_files"] = [str(path) for path in written]
        summaries.append(summary)
    summary = {
        "model": str(args.model),
        "model_id": model_id,
        "benchmark": task.benchmark.name if task.benchmark is not None else None,
        "questions": str(task.benchmark.question_path if task.benchmark is not None else args.questions),
        "num_questions": len(task.questions),
        "num_with_ground_truth": sum(truth is not None for truth in task.truths),
        "batch_size": args.batch_size,
        "max_new_tokens": task.max_new_tokens,
        "answer_files": {s.name: str(answer_file_path(task.output_dir, s)) for s in settings},
        "settings": summaries,
    }
    (task.output_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    if args.no_plot:
        return summary
    try:
        plot_summary(summaries, task.output_dir / "summary.png", title=f"{model_id} on {task.name}")
    except ImportError:
        print("matplotlib is not installed: no plot (pip install 'llava-trim[plot]').", file=sys.stderr)
    return summary


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; see `--help`."""
    args = parse_args(argv)
    try:
        summaries = evaluate(args)
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\nInterrupted. The answers written so far are in {args.output_dir}: run the same command to resume.")
        return 130
    for summary in summaries:
        if summary["benchmark"]:
            print(f"== {summary['benchmark']}")
        print(format_summary_table(summary["settings"]))
        for setting in summary["settings"]:
            if setting.get("score"):
                print(f"{setting['setting']}: {_headline(setting['score'])}")
    if summaries:
        print(f"Wrote answer files and summaries under {args.output_dir}")
    return 0


def _headline(score: dict) -> str:
    """The top-level numbers of a benchmark score, for the terminal."""
    return ", ".join(f"{key} {value:.4g}" for key, value in score.items() if isinstance(value, float | int))


__all__ = [
    "AnswerFile",
    "Processes",
    "Setting",
    "evaluate",
    "load_ground_truth",
    "load_questions",
    "merge_answers",
    "normalize_answer",
    "parse_setting",
    "parse_yes_no",
    "start_processes",
    "summarize_setting",
    "vqa_accuracy",
    "yes_no_metrics",
]


if __name__ == "__main__":
    sys.exit(main())
