"""`--resume`: a run interrupted after a checkpoint and resumed ends with the weights of an uninterrupted run."""

import pytest
import torch
from test_finetune import data_dir, preprocessing  # noqa: F401 (fixtures)
from test_finetune_distributed import model_dir  # noqa: F401 (fixture)
from transformers import TrainerCallback

from llava_trim.tools.finetune import parse_args, train


class StopAfter(TrainerCallback):
    """Stops training after `step` optimiser steps, as an interruption would (the checkpoint at `step` is written)."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            control.should_training_stop = True
        return control


def _args(model_dir, data_dir, output, *extra):  # noqa: F811
    return parse_args(
        ["--model", str(model_dir), "--data", str(data_dir / "data.json"), "--image-folder", str(data_dir / "images")]
        + ["--output", str(output), "--max-steps", "6", "--save-steps", "3", "--batch-size", "2"]
        + ["--learning-rate", "1e-3", "--warmup-ratio", "0.2", "--logging-steps", "1", "--seed", "1"]
        + list(extra)
    )


def test_interrupted_and_resumed_run_ends_with_the_uninterrupted_weights(tmp_path, model_dir, data_dir):  # noqa: F811
    # 8 records, batch 2: 6 steps run into the second epoch, so the resumed run must also reshuffle as the first did
    reference = train(_args(model_dir, data_dir, tmp_path / "straight"))
    assert reference.state.global_step == 6

    interrupted = train(_args(model_dir, data_dir, tmp_path / "resumed"), callbacks=[StopAfter(3)])
    assert interrupted.state.global_step == 3
    assert (tmp_path / "resumed" / "checkpoint-3").is_dir()
    half_way = {name: tensor.clone() for name, tensor in interrupted.model.state_dict().items()}

    resumed = train(_args(model_dir, data_dir, tmp_path / "resumed", "--resume"))
    assert resumed.state.global_step == 6
    losses = [[entry["loss"] for entry in run.state.log_history if "loss" in entry] for run in (reference, resumed)]
    assert losses[1] == pytest.approx(losses[0], rel=1e-5)  # steps 1 to 3 from the checkpoint, then 4 to 6
    final, expected = resumed.model.state_dict(), reference.model.state_dict()
    moved = 0
    for name, tensor in expected.items():
        torch.testing.assert_close(final[name], tensor, rtol=1e-5, atol=1e-6, msg=name)
        moved += not torch.equal(final[name], half_way[name])
    assert moved > 0  # the resumed steps trained


def test_resume_without_a_checkpoint_says_so(tmp_path, model_dir, data_dir):  # noqa: F811
    with pytest.raises(FileNotFoundError, match="no checkpoint-N folder in .*--save_steps N"):
        train(_args(model_dir, data_dir, tmp_path / "fresh", "--resume"))
