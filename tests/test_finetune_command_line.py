"""The fine-tuning command line: the TRIM seed's own flag list (LLaVA's train.py) on the tiny stage-2 start, flags that
contradict the model refused, TensorBoard logs, and data problems ending in one line with nothing written."""

import json

import pytest
import torch
from safetensors.torch import load_file
from test_finetune import data_dir, preprocessing  # noqa: F401 (fixtures)
from test_finetune_distributed import model_dir  # noqa: F401 (fixture)

from llava_trim.testing_utils.tiny_checkpoints import (
    build_llava_pretrain_projector,
    build_tiny_clip,
    build_vicuna,
    load_clip_state_dict,
)
from llava_trim.tools.finetune import main


@pytest.fixture(scope="module")
def stage2_sources(tmp_path_factory):
    """LLaVA-1.5's stage-2 start, tiny: Vicuna, CLIP and the pretrain stage's mm_projector.bin."""
    root = tmp_path_factory.mktemp("stage2")
    return {
        "vicuna": build_vicuna(root / "vicuna"),
        "clip": build_tiny_clip(root / "clip"),
        "projector": build_llava_pretrain_projector(root / "projector"),
    }


def seed_flags(sources: dict, data_dir, output) -> list[str]:  # noqa: F811
    """FreedomIntelligence/TRIM's `scripts/finetune_8gpu_TRIM.sh` flags, paths swapped for the tiny ones.

    Also changed: `--deepspeed ./scripts/zero3.json` is left out (one CPU process), `--tf32 True` becomes False
    (TF32 is an NVIDIA GPU setting that transformers refuses elsewhere), `--report_to wandb` becomes tensorboard
    (offline), and `--max_steps 2` is added."""
    return [
        "--model_name_or_path", str(sources["vicuna"]),
        "--version", "v1",
        "--data_path", str(data_dir / "data.json"),
        "--image_folder", str(data_dir / "images"),
        "--image_aspect_ratio", "pad",
        "--group_by_modality_length", "True",
        "--vision_tower", str(sources["clip"]),
        "--pretrain_mm_mlp_adapter", str(sources["projector"] / "mm_projector.bin"),
        "--mm_vision_select_layer", "-2",
        "--mm_vision_token_reduce_func", "TextSim+:-1",
        "--mm_use_im_start_end", "False",
        "--mm_use_im_patch_token", "False",
        "--mm_projector_type", "mlp2x_gelu",
        "--bf16", "True",
        "--output_dir", str(output),
        "--num_train_epochs", "1",
        "--per_device_train_batch_size", "4",
        "--per_device_eval_batch_size", "4",
        "--gradient_accumulation_steps", "4",
        "--evaluation_strategy", "no",
        "--save_strategy", "steps",
        "--save_steps", "5000",
        "--save_total_limit", "1",
        "--learning_rate", "2e-5",
        "--weight_decay", "0.",
        "--warmup_ratio", "0.03",
        "--lr_scheduler_type", "cosine",
        "--logging_steps", "1",
        "--tf32", "False",
        "--model_max_length", "2048",
        "--gradient_checkpointing", "True",
        "--dataloader_num_workers", "4",
        "--lazy_preprocess", "True",
        "--report_to", "tensorboard",
        "--max_steps", "2",
    ]  # fmt: skip


def test_the_seeds_flags_train_the_stage2_start_built_by_the_converter(stage2_sources, data_dir, tmp_path):  # noqa: F811
    pytest.importorskip("tensorboard")
    output = tmp_path / "finetuned"
    trainer = main(seed_flags(stage2_sources, data_dir, output))
    args = trainer.args
    assert trainer.state.global_step == 2
    assert (args.gradient_accumulation_steps, args.warmup_steps, args.eval_strategy) == (4, 0.03, "no")
    assert args.bf16 and args.activation_checkpointing and args.lr_scheduler_type == "cosine"

    # the starting model is what the converter writes for Vicuna + the projector + CLIP, "TextSim+:-1" its trim_ratio
    start = tmp_path / "finetuned-stage2-start"
    config = json.loads((start / "config.json").read_text())
    assert config["trim_ratio"] == -1 and config["vision_feature_layer"] == -2
    saved = load_file(output / "model.safetensors")
    assert json.loads((output / "config.json").read_text())["trim_ratio"] == -1
    # the converter keeps the Vicuna source's float16; the frozen towers come out as they went in (read as float32)
    start_state = {}
    for shard in start.glob("*.safetensors"):
        start_state.update(load_file(shard))
    frozen = [name for name in start_state if name.startswith(("model.vision_tower.", "model.trim_scorer."))]
    assert "model.vision_tower.encoder.layers.0.mlp.fc1.weight" in frozen
    for name in frozen:
        assert torch.equal(saved[name], start_state[name].to(saved[name].dtype)), name
    clip = load_clip_state_dict(stage2_sources["clip"])
    fc1 = clip["vision_model.encoder.layers.0.mlp.fc1.weight"]
    assert torch.equal(start_state["model.vision_tower.encoder.layers.0.mlp.fc1.weight"], fc1.to(torch.float16))
    projector = torch.load(stage2_sources["projector"] / "mm_projector.bin", weights_only=True)
    assert not torch.equal(
        saved["model.multi_modal_projector.linear_1.weight"], projector["model.mm_projector.0.weight"].float()
    )

    # --report_to tensorboard: the Trainer's TensorBoard callback wrote the training loss
    events = list(output.glob("runs/*/events.out.tfevents.*"))
    assert events, sorted(str(path.relative_to(output)) for path in output.rglob("*"))
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(events[0].parent))
    accumulator.Reload()
    assert len(accumulator.Scalars("train/loss")) == 2


def common_flags(model_dir, data_dir, output):  # noqa: F811
    return [
        "--model_name_or_path", str(model_dir), "--data_path", str(data_dir / "data.json"),
        "--image_folder", str(data_dir / "images"), "--output_dir", str(output), "--max_steps", "1",
        "--per_device_train_batch_size", "2",
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (
            ["--mm_vision_select_layer", "-1"],
            "--mm_vision_select_layer -1: the model reads the vision tower's layer -2",
        ),
        (["--mm_projector_type", "linear"], "--mm_projector_type linear: the model's projector is mlp2x_gelu"),
        (["--mm_use_im_start_end", "True"], "has no such tokens; pass False"),
        (["--version", "plain"], "--version plain: this tool trains LLaVA-1.5's second stage"),
        (["--mm_vision_token_reduce_func", "TRIM:0.5"], "contradicts the trim_ratio -1 the model trains with"),
    ],
)
def test_flags_that_contradict_the_model_are_refused_in_one_sentence(model_dir, data_dir, tmp_path, flags, message):  # noqa: F811
    output = tmp_path / "refused"
    with pytest.raises(SystemExit) as refusal:
        main(common_flags(model_dir, data_dir, output) + flags)
    assert str(refusal.value).startswith("error: ") and message in str(refusal.value)
    assert not output.exists()


def test_flags_that_describe_the_model_are_accepted(model_dir, data_dir, tmp_path):  # noqa: F811
    describing = ["--mm_vision_select_layer", "-2", "--mm_projector_type", "mlp2x_gelu", "--version", "v1"]
    describing += ["--mm_vision_token_reduce_func", "TRIM:0.5", "--trim_ratio", "0.5", "--report_to", "none"]
    trainer = main(common_flags(model_dir, data_dir, tmp_path / "ok") + describing)
    assert trainer.state.global_step == 1 and trainer.model.config.trim_ratio == 0.5


@pytest.mark.parametrize("problem", ["missing", "truncated"])
def test_a_missing_or_truncated_data_file_is_one_line(model_dir, data_dir, tmp_path, problem):  # noqa: F811
    data = tmp_path / "data.json"
    if problem == "truncated":
        data.write_text((data_dir / "data.json").read_text()[:-40])
    flags = common_flags(model_dir, data_dir, tmp_path / "out")
    flags[flags.index("--data_path") + 1] = str(data)
    with pytest.raises(SystemExit) as refusal:
        main(flags)
    expected = "No such file or directory" if problem == "missing" else "the list is not closed|invalid JSON"
    assert str(refusal.value).startswith("error: ")
    assert any(part in str(refusal.value) for part in expected.split("|")), str(refusal.value)
    assert not (tmp_path / "out").exists()


def bad_data(data_dir, tmp_path, all_bad: bool):  # noqa: F811
    records = json.loads((data_dir / "data.json").read_text())
    missing = {**records[0], "id": "gone", "image": "nowhere.png"}
    records = [missing] * 4 if all_bad else [missing] + records
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(records))
    return path


@pytest.mark.parametrize("workers", [0, 1])  # read in this process, or in a data loader worker
def test_no_skip_bad_samples_stops_in_one_line_without_an_empty_output(model_dir, data_dir, tmp_path, workers):  # noqa: F811
    flags = common_flags(model_dir, data_dir, tmp_path / "out") + ["--no_skip_bad_samples"]
    flags += ["--dataloader_num_workers", str(workers)]
    flags[flags.index("--data_path") + 1] = str(bad_data(data_dir, tmp_path, all_bad=False))
    flags += ["--train_sampling_strategy", "sequential"]
    with pytest.raises(SystemExit) as refusal:
        main(flags)
    message = str(refusal.value)
    assert message.startswith("error: Record 'gone': image ") and "--no_skip_bad_samples stops" in message
    assert "Traceback" not in message
    assert not (tmp_path / "out").exists()


def test_no_usable_record_fails_and_writes_no_model(model_dir, data_dir, tmp_path):  # noqa: F811
    flags = common_flags(model_dir, data_dir, tmp_path / "out")
    flags[flags.index("--data_path") + 1] = str(bad_data(data_dir, tmp_path, all_bad=True))
    with pytest.raises(SystemExit) as refusal:
        main(flags)
    assert "No usable record: all 4 samples read were skipped" in str(refusal.value)
    assert not (tmp_path / "out" / "config.json").exists() and not list((tmp_path / "out").glob("*.safetensors"))
