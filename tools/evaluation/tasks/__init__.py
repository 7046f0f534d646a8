# Copyright 2026 The llava-trim authors. Licensed under the Apache License, Version 2.0.
"""The TRIM paper's 12 benchmarks as LLaVA-1.5 evaluates them, in the layout of LLaVA's `docs/Evaluation.md`
(`eval.zip` unpacked into `playground/data/eval`): questions, answer formats and local scores."""

from pathlib import Path

from .choice import MMBench, MMBenchCN, ScienceQA, SEEDBench
from .common import Benchmark
from .free_form import LLaVABench, MMVet
from .vqa import GQA, TextVQA, VizWiz, VQAv2, normalize_vqa_answer, textvqa_question, vqa_score
from .yes_no import MME, POPE, mme_answer, mme_task_score, pope_answer, pope_metrics

BENCHMARKS: dict[str, type[Benchmark]] = {
    benchmark.name: benchmark
    for benchmark in (
        VQAv2,
        GQA,
        VizWiz,
        ScienceQA,
        TextVQA,
        POPE,
        MME,
        MMBench,
        MMBenchCN,
        SEEDBench,
        LLaVABench,
        MMVet,
    )
}


def get_benchmarks(names: list[str], data_root: str | Path) -> list[Benchmark]:
    """The benchmarks `names` stand for (`all`: every one whose question file is under `data_root`)."""
    if "all" in names:
        present = [benchmark(data_root) for benchmark in BENCHMARKS.values() if benchmark(data_root).is_present()]
        if not present:
            raise FileNotFoundError(
                f"No benchmark's question file is under {data_root}. Unpack LLaVA's eval.zip there (or pass "
                "--data-root), as LLaVA's docs/Evaluation.md describes."
            )
        return present
    unknown = [name for name in names if name not in BENCHMARKS]
    if unknown:
        raise ValueError(f"Unknown benchmark {unknown[0]!r}: choose from {', '.join(BENCHMARKS)} or 'all'.")
    benchmarks = [BENCHMARKS[name](data_root) for name in dict.fromkeys(names)]
    for benchmark in benchmarks:
        benchmark.check_present()
    return benchmarks


__all__ = [
    "BENCHMARKS",
    "Benchmark",
    "get_benchmarks",
    "mme_answer",
    "mme_task_score",
    "normalize_vqa_answer",
    "pope_answer",
    "pope_metrics",
    "textvqa_question",
    "vqa_score",
]
