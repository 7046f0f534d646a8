# Copyright 2026 The llava-trim authors. Licensed under the Apache License, Version 2.0.
"""GPT-judged free-form benchmarks: LLaVA-Bench (in the wild) and MM-Vet. Only answer files are written here: their
scores come from a GPT judge (LLaVA's `eval_gpt_review_bench.py`, the MM-Vet evaluator)."""

from pathlib import Path

from .common import Benchmark, write_json


class LLaVABench(Benchmark):
    name, title, folder = "llava_bench", "LLaVA-Bench (in the wild)", "llava-bench-in-the-wild"
    question_file = "questions.jsonl"
    image_folder = "images"
    max_new_tokens = 1024
    scoring = "GPT judge: answer file only"


class MMVet(Benchmark):
    name, title, folder = "mmvet", "MM-Vet", "mm-vet"
    question_file = "llava-mm-vet.jsonl"
    image_folder = "images"
    max_new_tokens = 1024
    scoring = "GPT judge (MM-Vet evaluator): answers as mmvet_<setting>.json"

    def write_outputs(self, records, questions, output_dir: Path, tag: str) -> list:
        results = {f"v1_{record['question_id']}": record["text"] for record in records}
        return [write_json(output_dir / f"mmvet_{tag}.json", results, indent=2)]
