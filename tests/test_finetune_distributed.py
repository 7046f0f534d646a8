"""Fine-tuning on several processes: 2 CPU processes (gloo) under torchrun and accelerate launch give what 1 process
gives with the same global batch; the shipped DeepSpeed and FSDP configs load."""

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from test_finetune import data_dir, preprocessing  # noqa: F401 (fixtures)

from llava_trim.testing_utils.tiny import tiny_model

RUNNER = textwrap.dedent(
    """
    import json, os, sys, torch, transformers
    from llava_trim.tools.finetune import main

    if os.environ.get("FINETUNE_TEST_FLOAT64") == "1":  # see UPDATE_RTOL below
        auto = transformers.AutoModelForImageTextToText
        load = auto.from_pretrained
        auto.from_pretrained = lambda *a, **k: load(*a, **{**k, "dtype": torch.float64})
    trainer = main(sys.argv[2:])
    rank = trainer.args.process_index
    state = {name: tensor.detach().cpu() for name, tensor in trainer.model.state_dict().items()}
    torch.save(
        {"state": state, "world_size": trainer.args.world_size, "log": trainer.state.log_history},
        f"{sys.argv[1]}/rank{rank}.pt",
    )
    """
)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, preprocessing):  # noqa: F811
    from llava_trim.processing_llava_trim import LlavaTrimProcessor

    root = tmp_path_factory.mktemp("model")
    tiny_model(seed=0).save_pretrained(root)
    LlavaTrimProcessor(
        preprocessing["image_processor"], preprocessing["tokenizer"], preprocessing["clip_tokenizer"]
    ).save_pretrained(root)
    return root


def _launch(
    launcher: list[str],
    tmp_path: Path,
    model_dir: Path,
    data_dir: Path,  # noqa: F811
    *args: str,
    mixed: bool = True,
    float64: bool = True,
) -> dict:
    """Run the finetune tool through `launcher` on the mixed data (or the image records only), with plain SGD instead
    of AdamW and float64 weights unless `float64=False` (see UPDATE_RTOL); returns each rank's final weights and logs,
    and the output."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    runner = tmp_path / "runner.py"
    runner.write_text(RUNNER)
    output = tmp_path / "finetuned"
    command = launcher + [str(runner), str(tmp_path)]
    data = _mixed_data(data_dir) if mixed else data_dir / "data.json"
    command += ["--model", str(model_dir), "--data", str(data)]
    command += ["--image-folder", str(data_dir / "images"), "--output", str(output)]
    command += ["--max-steps", "3", "--learning-rate", "1e-3", "--warmup-ratio", "0", "--logging-steps", "1"]
    command += ["--optim", "sgd"]  # plain SGD, see UPDATE_RTOL
    command += list(args)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    env.update(FINETUNE_TEST_FLOAT64="1" if float64 else "0")
    run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=180, cwd=tmp_path)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]
    ranks = [torch.load(path, weights_only=True) for path in sorted(tmp_path.glob("rank*.pt"))]
    return {"ranks": ranks, "stdout": run.stdout, "output": output}


def _mixed_data(data_dir: Path) -> Path:  # noqa: F811
    """The eight image records with four text-only ones between them: processes see different modalities in a step,
    so DDP must cope with the projector unused on one of them."""
    path = data_dir / "mixed.json"
    if not path.is_file():
        records = json.loads((data_dir / "data.json").read_text())
        text_only = {"conversations": [{"from": "human", "value": "Say hi."}, {"from": "gpt", "value": "Hi there."}]}
        for index in (1, 4, 7, 10):
            records.insert(index, {"id": f"text{index}", **text_only})
        path.write_text(json.dumps(records))
    return path


LAUNCHERS = {
    "torchrun": [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"],
    # on a machine without GPUs, `--multi_gpu` only picks accelerate's multi-process launcher (`--cpu
    # --num_processes 2` would start one process); the Trainer then runs on CPU over gloo
    "accelerate": [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"],
}


@pytest.fixture(scope="module")
def single_process(tmp_path_factory, model_dir, data_dir):  # noqa: F811
    tmp_path = tmp_path_factory.mktemp("single")
    options = ("--batch-size", "2", "--gradient-checkpointing")
    return _launch([sys.executable], tmp_path, model_dir, data_dir, *options)


# Tolerance of the two-process vs one-process comparison, derived rather than observed. Both runs compute the same
# float64 sums in different orders (one batch of 2 vs two batches of 1 plus an all-reduce). A sum of n terms in any
# order is within n * u * sum(|terms|) of the exact one (u = 2**-53 = 1.1e-16); the longest reduction here is a weight
# gradient over the 2 samples' positions (n < 2 * 2048 = 4.1e3, the tool's --max-length), so the noise is below
# 4.1e3 * 1.1e-16 = 4.5e-13 of sum(|terms|), and below 1e-10 of the result while cancellation loses fewer than
# 200x (sum(|terms|) / |sum|): that bound is the tolerance, on each tensor's update (final - initial weights), in norm.
# Plain SGD makes the update lr * (sum of the 3 steps' gradients), a linear function of them (AdamW divides by the
# square root of the second moment, which turns rounding noise in a near-zero gradient into a full-size update; that
# is what failed in float32 on another CPU). A real fault (another sample on a process, another loss weighting)
# changes the update by a whole sample's share, >= 1e-2 relative: 8 orders of magnitude above the tolerance.
UPDATE_RTOL = 1e-10
# The Trainer logs the loss through a float32 accumulator and a mean over the processes: a few float32 roundings
# (<= 4 * 2**-24 = 2.4e-7 relative) on top of the float64 noise above.
LOSS_RTOL = 1e-6


@pytest.mark.parametrize("launcher", sorted(LAUNCHERS))
def test_two_processes_train_as_one_process_with_the_same_global_batch(
    launcher,
    tmp_path,
    model_dir,
    data_dir,  # noqa: F811
    single_process,
):
    options = ("--batch-size", "1", "--gradient-checkpointing")
    two = _launch(LAUNCHERS[launcher], tmp_path, model_dir, data_dir, *options)
    assert [rank["world_size"] for rank in two["ranks"]] == [2, 2]
    assert [rank["world_size"] for rank in single_process["ranks"]] == [1]

    # every rank ends with the same weights, and they are the one-process run's weights
    first, second = (rank["state"] for rank in two["ranks"])
    reference = single_process["ranks"][0]["state"]
    initial = {name: tensor.double() for name, tensor in tiny_model(seed=0).state_dict().items()}
    assert first.keys() == reference.keys()
    for name, tensor in reference.items():
        assert tensor.dtype == torch.float64, name
        assert torch.equal(first[name], second[name]), name
        frozen = name.startswith(("model.vision_tower.", "model.trim_scorer."))
        assert torch.equal(tensor, initial[name]) == frozen, name
        update, two_process_update = tensor - initial[name], first[name] - initial[name]
        difference = torch.linalg.vector_norm(two_process_update - update)
        assert difference <= UPDATE_RTOL * torch.linalg.vector_norm(update), (name, difference)

    # the loss is weighted by answer tokens over both processes, as one process weights its batch
    losses = [[entry["loss"] for entry in run["ranks"][0]["log"] if "loss" in entry] for run in (two, single_process)]
    assert len(losses[0]) == len(losses[1]) == 3
    assert losses[0] == pytest.approx(losses[1], rel=LOSS_RTOL)

    # one process wrote the output, and it is what the ranks trained
    assert two["stdout"].count("saved the fine-tuned model") == 1
    assert (two["output"] / "modeling_llava_trim.py").is_file()
    from safetensors.torch import load_file

    saved = load_file(two["output"] / "model.safetensors")
    for name, tensor in saved.items():
        assert torch.equal(tensor, first[name]), name


# DeepSpeed's CPU accelerator trains in float32 only, so its run is compared with the float64 one-process run (plain
# SGD on both sides, as above) through a float32 bound on each tensor's update U = final - initial weights, in norm:
# - rounding of the sums: the longest has n < 1.2e3 terms (2 image samples' ~600 positions); by Higham and Mary's
#   probabilistic bound (SIAM J. Sci. Comput. 2019) a float32 sum is within lambda sqrt(n) u sum(|terms|) of the exact
#   one except with probability < 2 exp(-lambda^2 / 2), so with lambda = 8 (< 3e-14 per sum),
#   8 * 35 * 2**-24 = 1.7e-5 of sum(|terms|); through the ~10 chained sums of the forward and backward passes and
#   cancellation below 5x, under 1e-3 of the update;
# - rounding of the weights at each of the 3 steps: <= 3 u ||w|| (computed, not assumed).
# A real fault (a sample missed or counted twice, another loss weighting, a lost shard) moves the update by a whole
# sample's share, >= 1e-2 of it: 10x above the tolerance.
FLOAT32_UPDATE_RTOL = 1e-3


def _compare_with_single_process(run: dict, single_process: dict, sharded: bool = False) -> None:
    reference = single_process["ranks"][0]["state"]
    initial = {name: tensor.double() for name, tensor in tiny_model(seed=0).state_dict().items()}

    def assert_same_update(name: str, tensor: torch.Tensor) -> None:
        assert tensor.dtype == torch.float32 and reference[name].dtype == torch.float64, name
        update, reference_update = tensor.double() - initial[name], reference[name] - initial[name]
        difference = torch.linalg.vector_norm(update - reference_update)
        bound = FLOAT32_UPDATE_RTOL * torch.linalg.vector_norm(reference_update)
        bound += 3 * 2.0**-24 * torch.linalg.vector_norm(tensor.double())
        assert difference <= bound, (name, difference, bound)

    for rank in [] if sharded else run["ranks"]:  # a sharded model's state on one rank is that rank's shard
        for name, tensor in rank["state"].items():
            assert_same_update(name, tensor)
    from transformers import AutoModelForImageTextToText

    # read back as users do: under ZeRO-3 the Trainer saves the gathered weights under the legacy LLaVA key names
    # (`language_model.model.*`), which loading maps back
    saved = AutoModelForImageTextToText.from_pretrained(
        run["output"], trust_remote_code=True, dtype=torch.float32
    ).state_dict()
    assert saved.keys() == reference.keys()
    for name, tensor in saved.items():
        assert_same_update(name, tensor)


HAS_DEEPSPEED = importlib.util.find_spec("deepspeed") is not None


@pytest.fixture(scope="module")
def single_process_images(tmp_path_factory, model_dir, data_dir):  # noqa: F811
    tmp_path = tmp_path_factory.mktemp("single_images")
    return _launch([sys.executable], tmp_path, model_dir, data_dir, "--batch-size", "2", mixed=False)


@pytest.mark.skipif(not HAS_DEEPSPEED, reason="needs `pip install deepspeed`")
@pytest.mark.parametrize("config", ["zero2", "zero3"])
def test_deepspeed_on_two_processes_trains_as_one_process(
    config,
    tmp_path,
    model_dir,
    data_dir,  # noqa: F811
    single_process_images,
):
    """DeepSpeed runs on CPU too (its CPU accelerator): ZeRO-2 and ZeRO-3 with the shipped configs end where one
    process without DeepSpeed ends, and the saved model (ZeRO-3's shards gathered) holds those weights.

    On image records only: with AdamW (the tool's default), DeepSpeed's optimiser updates a parameter that got no
    gradient in a step (the projector in a text-only step) as if its gradient were zero (its Adam moments keep moving
    it), where torch's AdamW leaves it; the comparison itself runs with plain SGD (see FLOAT32_UPDATE_RTOL)."""
    options = ("--batch-size", "1", "--deepspeed", config)
    run = _launch(LAUNCHERS["torchrun"], tmp_path, model_dir, data_dir, *options, mixed=False, float64=False)
    assert [rank["world_size"] for rank in run["ranks"]] == [2, 2]
    assert run["stdout"].count("saved the fine-tuned model") == 1
    _compare_with_single_process(run, single_process_images, sharded=config == "zero3")


def test_fsdp_refuses_to_fall_back_to_plain_data_parallelism(tmp_path, model_dir, data_dir):  # noqa: F811
    """accelerate shards with FSDP on accelerators only; on CPU the tool says so instead of silently not sharding."""
    with pytest.raises(AssertionError, match="the Trainer did not shard the model"):
        _launch(LAUNCHERS["torchrun"], tmp_path, model_dir, data_dir, "--batch-size", "1", "--fsdp", "full_shard")


# ---------------------------------------------------------------------------------------------------------------------
# DeepSpeed and FSDP configs
# ---------------------------------------------------------------------------------------------------------------------

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


@pytest.mark.parametrize("name", ["zero2", "zero3", "zero3_offload"])
def test_deepspeed_configs_leave_the_recipe_to_the_trainer(name):
    """The shipped ZeRO configs parse, use the stage they are named after, and take batch sizes, learning rate and
    precision from the Trainer's arguments ("auto"), so `--recipe` and flags stay the one source of them."""
    config = json.loads((CONFIGS / f"deepspeed_{name}.json").read_text())
    stage = int(name[4])
    assert config["zero_optimization"]["stage"] == stage
    offloaded = {key: value["device"] for key, value in config["zero_optimization"].items() if "offload" in key}
    assert offloaded == ({"offload_optimizer": "cpu", "offload_param": "cpu"} if "offload" in name else {})
    for key in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size"):
        assert config[key] == "auto", key
    assert config["bf16"]["enabled"] == "auto" and config["fp16"]["enabled"] == "auto"
    assert config["gradient_clipping"] == "auto"
    if stage == 3:
        # the Trainer gathers the sharded weights when it saves
        assert config["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True


def test_fsdp_config_loads_into_training_arguments():
    from llava_trim.tools.finetune import parse_args

    common = ["--model", "m", "--data", "d.json", "--output", "o"]
    training_args = parse_args(common + ["--fsdp", "full_shard"]).training
    assert training_args.fsdp
    assert parse_args(common + ["--deepspeed", "zero3"]).training.deepspeed == str(CONFIGS / "deepspeed_zero3.json")
    with pytest.raises(SystemExit):
        parse_args(common + ["--deepspeed", "zero4"])  # neither a shipped name nor a file
    config = training_args.fsdp_config  # configs/fsdp_full_shard.json, loaded by TrainingArguments
    # the frozen CLIP towers and TRIM's scorer sit in the same wrapped units as trained weights only with
    # per-parameter sharding (FSDP 2) or `use_orig_params`
    assert config["version"] == 2 or config["use_orig_params"] is True
    assert "LlamaDecoderLayer" in config["transformer_layer_cls_to_wrap"]
    assert config["activation_checkpointing"] is True  # the recipe's checkpointing, done the FSDP way
