# Copyright 2026 The llava-trim authors. Licensed under the Apache License, Version 2.0.
"""Yes/no benchmarks: POPE (accuracy, precision, recall, F1 per split) and MME (perception and cognition scores)."""

from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

from .common import Benchmark, read_jsonl, write_lines

# ---------------------------------------------------------------------------------------------------------------------
# POPE
# ---------------------------------------------------------------------------------------------------------------------


def pope_answer(text: str) -> str:
    """
    POPE's reading of an answer, as LLaVA's `eval_pope.py`: the text up to the first period, commas dropped, split
    on single spaces; "no" if one of the words is exactly `No`, `no` or `not` (case-sensitive), else "yes".

    So `"No, there is not."` -> "no", but `"NO"`, `"no!"` and `"Not really."` -> "yes".
    """
    first_sentence = text.split(".")[0]
    words = first_sentence.replace(",", "").split(" ")
    return "no" if {"No", "no", "not"} & set(words) else "yes"


def pope_metrics(answers: Sequence[str], labels: Sequence[str]) -> dict:
    """Accuracy, precision, recall, F1 and yes-ratio of answer texts against `yes`/`no` labels, paired by position."""
    predicted = [pope_answer(text) == "yes" for text in answers]
    positive = [label != "no" for label in labels]
    pairs = list(zip(predicted, positive, strict=False))  # the reference pairs by position, up to the shorter list
    tp = sum(p and t for p, t in pairs)
    fp = sum(p and not t for p, t in pairs)
    tn = sum(not p and not t for p, t in pairs)
    fn = sum(not p and t for p, t in pairs)
    precision = tp / (tp + fp) if tp + fp else 0.0  # the reference divides by zero here
    recall = tp / (tp + fn) if tp + fn else 0.0
    return {
        "num_questions": len(pairs),
        "accuracy": (tp + tn) / len(pairs) if pairs else 0.0,
        "precision": precision,
        "recall": recall,
        "f1": 2 * precision * recall / (precision + recall) if precision + recall else 0.0,
        "yes_ratio": sum(predicted) / len(predicted) if predicted else 0.0,
        "tp": tp,
        "fp": fp,
        "tn": tn,
        "fn": fn,
    }


class POPE(Benchmark):
    name, title, folder = "pope", "POPE", "pope"
    question_file = "llava_pope_test.jsonl"
    image_folder = "val2014"
    annotation_folder = "coco"
    scoring = "local: accuracy, precision, recall, F1 per split (coco/coco_pope_<split>.json)"

    def score(self, records, questions) -> dict | None:
        """Metrics per split, as LLaVA's `eval_pope.py`; F1 and accuracy averaged over the splits. Splits with no
        answer yet are left out (not averaged in as zeros); `partial` says when not every labelled question is answered
        (a `--limit` run, or one still to resume)."""
        label_files = sorted((self.root / self.annotation_folder).glob("coco_pope_*.json"))
        if not label_files or not records:
            return None
        category = {question["question_id"]: question.get("category") for question in questions}
        splits, num_questions = {}, 0
        for path in label_files:
            split = path.name[len("coco_pope_") : -len(".json")]
            labels = [record["label"] for record in read_jsonl(path)]
            num_questions += len(labels)
            # answers of this split in answer-file order, paired with the label lines by position
            answers = [record["text"] for record in records if category.get(record["question_id"]) == split]
            if answers:
                splits[split] = pope_metrics(answers, labels)
        score = {
            "f1": sum(split["f1"] for split in splits.values()) / len(splits),
            "accuracy": sum(split["accuracy"] for split in splits.values()) / len(splits),
            "splits": splits,
        }
        if len(records) < num_questions:
            score.update(partial=True, num_answered=len(records), num_questions=num_questions)
        return score


# ---------------------------------------------------------------------------------------------------------------------
# MME
# ---------------------------------------------------------------------------------------------------------------------

MME_PERCEPTION = [
    "existence",
    "count",
    "position",
    "color",
    "posters",
    "celebrity",
    "scene",
    "landmark",
    "artwork",
    "OCR",
]
MME_COGNITION = ["commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning"]
_SHORT_ANSWER = "Answer the question using a single word or phrase."
_YES_NO = "Please answer yes or no."


def mme_answer(text: str) -> str:
    """MME's reading of an answer: lowercased `yes`/`no` as is, else `yes`/`no` found in the first four characters
    (`"yes"` first), else `other`."""
    text = text.lower()
    if text in ("yes", "no"):
        return text
    if "yes" in text[:4]:
        return "yes"
    if "no" in text[:4]:
        return "no"
    return "other"


def mme_task_score(rows: Sequence[tuple[str, str]]) -> dict:
    """
    The MME score of one task from `(ground truth, answer)` rows, two consecutive rows per image: `acc` (correct
    answers) + `acc_plus` (images with both answers correct), both in percent.
    """
    if len(rows) % 2:
        raise ValueError("MME scores two questions per image: this task has an odd number of answers.")
    truths = [truth.lower() for truth, _ in rows]
    parsed = [mme_answer(answer) for _, answer in rows]
    correct = [truth == answer for truth, answer in zip(truths, parsed, strict=True)]
    accuracy = sum(correct) / len(correct)
    accuracy_plus = sum(correct[i] and correct[i + 1] for i in range(0, len(correct), 2)) / (len(correct) // 2)
    return {"acc": 100 * accuracy, "acc_plus": 100 * accuracy_plus, "score": 100 * (accuracy + accuracy_plus)}


class MME(Benchmark):
    name, title, folder = "mme", "MME", "MME"
    question_file = "llava_mme.jsonl"
    image_folder = "MME_Benchmark_release_version"
    scoring = "local: perception and cognition scores (MME_Benchmark_release_version ground truth)"

    def ground_truth(self) -> dict[tuple[str, str, str], str]:
        """`(task, question file name, question) -> yes/no` from the MME release folder, as MME's tools read it."""
        truth = {}
        release = self.root / self.image_folder
        for task_folder in sorted(path for path in release.iterdir() if path.is_dir()):
            answer_folder = task_folder / "questions_answers_YN"
            if not (task_folder / "images").is_dir():
                answer_folder = task_folder
            for path in sorted(answer_folder.glob("*.txt")):
                for line in path.read_text(encoding="utf-8").splitlines():
                    if line.strip():
                        question, answer = line.strip().split("\t")
                        truth[(task_folder.name, path.name, question)] = answer
        return truth

    def rows_per_task(self, records: Sequence[dict], truth: dict) -> dict[str, list[tuple[str, str, str, str]]]:
        """`task -> [(question file, MME question, ground truth, answer)]` in answer-file order, as MME's converter
        pairs LLaVA's prompts with MME's questions."""
        tasks = defaultdict(list)
        for record in records:
            task = record["question_id"].split("/")[0]
            file = record["question_id"].split("/")[-1].split(".")[0] + ".txt"
            question = record["prompt"]
            if _SHORT_ANSWER in question:
                question = question.replace(_SHORT_ANSWER, "").strip()
            if _YES_NO not in question:
                question = question + " " + _YES_NO
                if (task, file, question) not in truth:
                    question = question.replace(" " + _YES_NO, "  " + _YES_NO)
            if (task, file, question) not in truth:
                raise ValueError(f"MME has no question {question!r} in {task}/{file}.")
            tasks[task].append((file, question, truth[(task, file, question)], record["text"]))
        return tasks

    def write_outputs(self, records, questions, output_dir: Path, tag: str) -> list:
        if not (self.root / self.image_folder).is_dir() or not records:
            return []
        written = []
        for task, rows in self.rows_per_task(records, self.ground_truth()).items():
            # MME's calculation.py reads one tab-separated line per answer: keep answers on one line
            lines = ["\t".join((*row[:3], " ".join(row[3].split()))) for row in rows]
            written.append(write_lines(output_dir / f"mme_{tag}" / f"{task}.txt", lines))
        return written

    def score(self, records, questions) -> dict | None:
        if not (self.root / self.image_folder).is_dir() or not records:
            return None
        tasks = self.rows_per_task(records, self.ground_truth())
        scores = {task: mme_task_score([(row[2], row[3]) for row in rows]) for task, rows in tasks.items()}
        result = {}
        for group, names in (("perception", MME_PERCEPTION), ("cognition", MME_COGNITION)):
            present = [name for name in names if name in scores]
            if present:
                result[group] = sum(scores[name]["score"] for name in present)
                result[f"{group}_tasks"] = {name: scores[name] for name in present}
        return result
