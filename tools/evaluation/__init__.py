# Copyright 2026 The llava-trim authors. Licensed under the Apache License, Version 2.0.
"""The parts of `python -m llava_trim.tools.evaluate`, one concern each.

- `tasks/`: the TRIM paper's 12 benchmarks as LLaVA-1.5 evaluates them (a new benchmark is one class there);
- `questions`: LLaVA question files, their ground truth and their images;
- `answers`: LLaVA answer files: appending, repairing an interrupted line, what is still to answer (resume), the
  per-process part files and their merge;
- `processes`: the share of the questions each process answers under `torchrun` / `accelerate launch`;
- `generation`: the prompt, batched greedy generation and the answer records;
- `scoring`: accuracy, yes/no metrics, kept tokens and speed per setting, the console table and the plot.
"""
