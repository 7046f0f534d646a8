# Copyright 2026 The llava-trim authors. Licensed under the Apache License, Version 2.0.
"""Evaluate LLaVA-TRIM on LLaVA-1.5's benchmarks: answers for several TRIM modes, scores, kept tokens and speed.

Two ways to name the questions:

- `--benchmark NAME ...` (or `all`): the TRIM paper's 12 benchmarks as LLaVA-1.5 evaluates them, read from LLaVA's
  `playground/data/eval` layout (see `llava_trim.tools.evaluation.tasks`): the same prompts, LLaVA's answer files, each
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
flushed one at a time: a rerun with the same output folder (any number of processes) answers only what is missing,
and refuses answers written by another model or with other generation options.

This file is the command line; the parts are in `llava_trim.tools.evaluation` (questions, answer files and resume,
processes, generation, scoring) and the benchmarks in `llava_trim.tools.evaluation.tasks`.

```bash
python -m llava_trim.tools.evaluate --model path/to/llava-v1.5-7b-trim --benchmark pope mme \
    --settings off auto 0.1 --output-dir results --batch-size 8
```
"""

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .cli import command_parser
from .evaluation.answers import (
    AnswerFile,
    Setting,
    answer_file_path,
    answers_for_questions,
    check_answers,
    merge_answers,
    part_file_path,
    pending_questions,
    read_answers,
)
from .evaluation.generation import generate_answers, run_setting
from .evaluation.processes import Processes, start_processes
from .evaluation.questions import check_images, load_ground_truth, load_questions, question_image
from .evaluation.scoring import format_summary_table, plot_summary, summarize_setting
from .evaluation.tasks import BENCHMARKS, Benchmark, get_benchmarks
from .loading import load_model_and_processor

EXAMPLE = """\
python -m llava_trim.tools.evaluate --model llava-v1.5-7b-trim --benchmark pope mme \\
    --data-root playground/data/eval --settings off auto 0.1 --output-dir results --batch-size 8"""


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = command_parser(
        "python -m llava_trim.tools.evaluate",
        "Answer LLaVA-1.5's benchmarks (or any LLaVA question file) with TRIM off, automatic and fixed ratios; write "
        "LLaVA answer files, each benchmark's submission or scorer files, and a summary of scores, kept tokens and "
        "speed. Rerun the same command to resume. Under torchrun or accelerate launch the questions are split over "
        "the processes.",
        EXAMPLE,
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
    num_all_questions: int = 0  # before --limit


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
            all_questions = benchmark.load_questions()
            questions = all_questions[: args.limit]
            tasks.append(
                Task(
                    benchmark.name,
                    questions,
                    output_dir / benchmark.name,
                    [None] * len(questions),
                    args.max_new_tokens or benchmark.max_new_tokens,
                    benchmark,
                    len(all_questions),
                )
            )
        return tasks
    if not args.image_folder:
        raise ValueError("--questions needs --image-folder, the folder its `image` paths are relative to.")
    all_questions = load_questions(args.questions)
    image_folder = Path(args.image_folder)
    questions = [{**q, "prompt": q["text"], "image_path": image_folder / q["image"]} for q in all_questions]
    questions = questions[: args.limit]
    truths = load_ground_truth(args.annotations, questions)
    name, max_new_tokens = Path(args.questions).name, args.max_new_tokens or 128
    return [Task(name, questions, output_dir, truths, max_new_tokens, None, len(all_questions))]


def generation_options(task: Task, args: argparse.Namespace) -> dict:
    """What an answer depends on besides the model and the TRIM setting; a resumed run must use the same."""
    return {"max_new_tokens": task.max_new_tokens, "dtype": args.dtype}


def evaluate(args: argparse.Namespace) -> list[dict]:
    """
    Run (or resume) the evaluation described by parsed command-line `args`; return the summaries written (one per
    benchmark; empty in every process but the first when several run).
    """
    if args.batch_size < 1 or (args.max_new_tokens is not None and args.max_new_tokens < 1):
        raise ValueError("--batch-size and --max-new-tokens must be at least 1.")
    if args.limit is not None and args.limit < 1:
        raise ValueError("--limit must be at least 1.")
    settings = [Setting.from_text(text) for text in args.settings]
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
            image = question_image(warm_up_with)
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
    check_answers(records, model_id, setting, generation_options(task, args), task.output_dir)
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
                    generation_options(task, args),
                    batch_size=args.batch_size,
                    progress=not args.no_progress,
                )
    except KeyboardInterrupt:
        if processes.world_size == 1:  # alone, the answers so far can be merged safely
            merge_answers(task.output_dir, setting, task.questions)
        raise
    processes.wait_for_everyone()
    if processes.rank == 0:
        merge_answers(task.output_dir, setting, task.questions)


def summarize_task(task: Task, settings: Sequence[Setting], model_id: str, args: argparse.Namespace) -> dict:
    """Score every setting's answers, write the benchmark's official files, `summary.json` and `summary.png`."""
    summaries = []
    for setting in settings:
        path = answer_file_path(task.output_dir, setting)
        records = AnswerFile(path).records if path.exists() else []
        summary = summarize_setting(setting, task.questions, records, task.truths)
        if summary["num_answered"] < task.num_all_questions:  # --limit, or answers still to resume
            summary["partial"] = f"{summary['num_answered']} of {task.num_all_questions} questions answered"
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
                partial = f" (partial: {setting['partial']})" if "partial" in setting else ""
                print(f"{setting['setting']}: {_headline(setting['score'])}{partial}")
    if summaries:
        print(f"Wrote answer files and summaries under {args.output_dir}")
    return 0


def _headline(score: dict) -> str:
    """The top-level numbers of a benchmark score, for the terminal."""
    numbers = {key: value for key, value in score.items() if type(value) in (float, int)}  # not booleans
    return ", ".join(f"{key} {value:.4g}" for key, value in numbers.items())


__all__ = [
    "Setting",
    "Task",
    "evaluate",
    "main",
    "parse_args",
]


if __name__ == "__main__":
    sys.exit(main())
