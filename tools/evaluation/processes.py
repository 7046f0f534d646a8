# Copyright 2026 The llava-trim authors. Licensed under the Apache License, Version 2.0.
"""One model per process under `torchrun` / `accelerate launch`, the questions split between the processes."""

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch


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
