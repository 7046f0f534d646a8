# Copyright 2026 The llava-trim authors. Licensed under the Apache License, Version 2.0.
"""Scores of one setting's answers (accuracy, yes/no metrics), what TRIM kept, the speed; the table and the plot."""

from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import torch

from .answers import Setting, answers_for_questions
from .tasks.vqa import normalize_vqa_answer, vqa_score
from .tasks.yes_no import pope_metrics


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


def _yes_no_label(truth: str) -> str:
    return "no" if normalize_vqa_answer(truth) == "no" else "yes"


def _is_yes_no(truth) -> bool:
    return isinstance(truth, str) and normalize_vqa_answer(truth) in ("yes", "no")


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
        summary["yes_no"] = pope_metrics([r["text"] for _, r, _ in yes_no], [_yes_no_label(t) for _, _, t in yes_no])
        categories = sorted({str(q["category"]) for q, _, _ in yes_no if "category" in q})
        if categories:
            summary["yes_no_by_category"] = {
                name: pope_metrics(
                    [r["text"] for q, r, _ in yes_no if str(q.get("category")) == name],
                    [_yes_no_label(t) for q, _, t in yes_no if str(q.get("category")) == name],
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
# Report
# ---------------------------------------------------------------------------------------------------------------------


def format_summary_table(summaries: Sequence[dict]) -> str:
    """A plain-text table of the per-setting summaries."""
    header = ["setting", "answered", "kept (mean)", "accuracy", "yes/no F1", "TTFT (s)", "q/s", "tokens/s"]
    rows = [header]

    def number(value, pattern="{:.3f}"):
        return "-" if value is None else pattern.format(value)

    for summary in summaries:
        timing, score = summary.get("timing", {}), summary.get("score") or {}
        rows.append(
            [
                summary["setting"],
                f"{summary['num_answered']}/{summary['num_questions']}",
                number(summary.get("kept_tokens", {}).get("mean"), "{:.1f}"),
                number(summary.get("accuracy", score.get("accuracy")), "{:.2%}"),  # a benchmark's own, else ours
                number(summary.get("yes_no", {}).get("f1", score.get("f1"))),
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
