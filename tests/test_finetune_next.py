"""Fine-tuning a LLaVA-NeXT (anyres) TRIM folder: the collator gives what the NeXT processor gives at inference, labels
cover the assistant answers only, the loss is native LLaVA-NeXT's with TRIM off, LLaVA-NeXT's train.py flags are
accepted when they describe the model and refused when they contradict it, and a few steps run from the command line
on a batch mixing text-only and image records."""

import json

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from test_finetune import data_dir  # noqa: F401 (fixture)

from llava_trim.testing_utils.tiny import TINY_IMAGE_TOKEN_ID
from llava_trim.testing_utils.tiny_next import build_tiny_next_processor, native_llava_next, tiny_next_model
from llava_trim.tools.finetune import IGNORE_INDEX, LlavaNextTrimDataCollator, LlavaTrimDataCollator, main

# float32 logits of native LLaVA-NeXT and of the TRIM model with TRIM off agree to 1e-5 (the family's parity bound,
# tests/test_modeling_llava_next_trim.py); a mean cross-entropy moves at most 2x the largest logit change
LOSS_TOL = 2e-5

RECORDS = [
    {  # wide image, two rounds
        "image": Image.new("RGB", (500, 300), (200, 30, 30)),
        "conversations": [
            {"from": "human", "value": "<image>\nWhat is the colour of the bus?"},
            {"from": "gpt", "value": "The bus is red."},
            {"from": "human", "value": "Is there a dog?"},
            {"from": "gpt", "value": "Yes."},
        ],
    },
    {"conversations": [{"from": "human", "value": "Hello!"}, {"from": "gpt", "value": "Hi there."}]},  # text only
    {  # tall image
        "image": Image.new("RGB", (200, 700), (30, 30, 200)),
        "conversations": [
            {"from": "human", "value": "What colour is this?\n<image>"},
            {"from": "gpt", "value": "Blue."},
        ],
    },
]
ANSWERS = [["The bus is red.", "Yes."], ["Hi there."], ["Blue."]]


@pytest.fixture(scope="module", params=["vicuna_v1", "mistral_instruct"])
def processor(request):
    return build_tiny_next_processor(conversation=request.param)


@pytest.fixture(scope="module")
def model():
    return tiny_next_model(seed=0)


def test_collator_is_built_from_the_next_processor(processor):
    collator = LlavaTrimDataCollator.from_processor(processor)
    assert type(collator) is LlavaNextTrimDataCollator and collator.conversation == processor.conversation
    assert collator.system_prompt == ("" if processor.conversation == "mistral_instruct" else processor_system())
    with pytest.raises(ValueError, match="LLaVA-NeXT tiles each image"):
        LlavaNextTrimDataCollator.from_processor(processor, pad_to_square=True)


def processor_system() -> str:
    from llava_trim.processing_llava_trim import VICUNA_V1_SYSTEM

    return VICUNA_V1_SYSTEM


def test_collator_gives_what_the_processor_gives_at_inference(processor):
    """Same ids (each image's own number of placeholders), crops, sizes and TRIM questions as the NeXT processor on
    the rendered conversations; text-only rows get no image entries."""
    collator = LlavaTrimDataCollator.from_processor(processor)
    batch = collator(RECORDS)
    chats = [
        collator_messages(collator, record)
        for record in RECORDS  # the same messages the collator renders
    ]
    texts = [processor.apply_chat_template(chat, tokenize=False) for chat in chats]
    images = [[record["image"]] if "image" in record else [] for record in RECORDS]
    questions = [["What is the colour of the bus?"], None, ["What colour is this?"]]
    inference = processor(
        images=images, text=texts, trim_text=questions, padding=True, padding_side="right", return_tensors="pt"
    )
    assert torch.equal(batch["input_ids"], inference["input_ids"])
    assert torch.equal(batch["attention_mask"], inference["attention_mask"])
    assert torch.equal(batch["pixel_values"], inference["pixel_values"])
    assert torch.equal(batch["image_sizes"], torch.tensor([[300, 500], [700, 200]]))
    width = batch["trim_input_ids"].shape[1]
    assert torch.equal(batch["trim_input_ids"], inference["trim_input_ids"][:, :width])
    # the two images have their own (native) numbers of positions, and the text-only row none
    counts = (batch["input_ids"] == TINY_IMAGE_TOKEN_ID).sum(dim=1).tolist()
    assert counts[1] == 0 and counts[0] != counts[2] and min(counts[0], counts[2]) > 576


def collator_messages(collator, record):
    from llava_trim.tools.finetune import conversation_to_messages

    messages, _ = conversation_to_messages(
        record["conversations"], collator.system_prompt, collator.image_token, record.get("image")
    )
    return messages


def test_labels_are_the_assistant_answers_only(processor):
    """LLaVA-1.5's rule on both templates: every answer and its closing `</s>` supervised, nothing else."""
    collator = LlavaTrimDataCollator.from_processor(processor)
    batch = collator(RECORDS)
    tokenizer = processor.tokenizer
    for row, answers in enumerate(ANSWERS):
        labels, ids = batch["labels"][row], batch["input_ids"][row]
        supervised = labels != IGNORE_INDEX
        assert torch.equal(labels[supervised], ids[supervised])
        # the supervised runs, decoded, are the answers each followed by </s>
        runs, current = [], []
        for position, flag in enumerate(supervised.tolist()):
            if flag:
                current.append(int(ids[position]))
            elif current:
                runs.append(current)
                current = []
        if current:
            runs.append(current)
        decoded = [tokenizer.decode(run).strip() for run in runs]
        assert [text.replace(" </s>", "</s>") for text in decoded] == [f"{answer}</s>" for answer in answers]
        assert not (supervised & (ids == TINY_IMAGE_TOKEN_ID)).any()


def test_loss_is_native_llava_nexts_with_trim_off(processor, model):
    """With TRIM off the model is native LLaVA-NeXT: the collator's batch gives native
    `LlavaNextForConditionalGeneration`'s loss on the same ids, crops, sizes and labels; with TRIM on it is finite."""
    collator = LlavaTrimDataCollator.from_processor(processor)
    batch = collator(RECORDS)
    native = native_llava_next(model)
    native_inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values", "image_sizes", "labels")}
    with torch.no_grad():
        expected = native(**native_inputs).loss
        off = model(**batch, trim_ratio=None).loss
        auto = model(**batch, trim_ratio=-1).loss
    assert abs(off.item() - expected.item()) <= LOSS_TOL, (off.item(), expected.item())
    assert torch.isfinite(auto)


# ---------------------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def next_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("next_model")
    tiny_next_model(seed=0).save_pretrained(root)
    build_tiny_next_processor(root)
    return root


@pytest.fixture(scope="module")
def mixed_data(data_dir):  # noqa: F811
    """The 1.5 tests' image records with text-only records between them."""
    records = json.loads((data_dir / "data.json").read_text())[:4]
    records.insert(
        1, {"id": "t1", "conversations": [{"from": "human", "value": "Hi!"}, {"from": "gpt", "value": "Hello."}]}
    )
    records.insert(
        3, {"id": "t2", "conversations": [{"from": "human", "value": "2+2?"}, {"from": "gpt", "value": "4."}]}
    )
    path = data_dir / "mixed.json"
    path.write_text(json.dumps(records))
    return path


def next_flags(model_dir, data_path, output) -> list[str]:
    return [
        "--model_name_or_path", str(model_dir), "--data_path", str(data_path),
        "--image_folder", str(data_path.parent / "images"), "--output_dir", str(output),
        "--per_device_train_batch_size", "3", "--learning_rate", "1e-3", "--report_to", "none",
        "--save_strategy", "no", "--seed", "0",
    ]  # fmt: skip


def test_a_few_steps_on_a_mixed_batch_train_the_projector_newline_and_language_model(next_dir, mixed_data, tmp_path):
    output = tmp_path / "finetuned"
    flags = ["--version", "v1", "--image_aspect_ratio", "anyres", "--mm_patch_merge_type", "spatial_unpad"]
    flags += ["--image_grid_pinpoints", "[(336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008)]"]
    flags += ["--mm_vision_select_layer", "-2", "--mm_projector_type", "mlp2x_gelu", "--max_steps", "6"]
    flags += ["--logging_steps", "1"]
    trainer = main(next_flags(next_dir, mixed_data, output) + flags)
    assert trainer.state.global_step == 6 and trainer.skipped_samples == 0
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 6 and all(torch.isfinite(torch.tensor(losses)))

    # the whole data set's loss (TRIM on, as trained) went down
    from llava_trim.tools.training_data import LlavaConversationDataset

    dataset = LlavaConversationDataset(mixed_data, mixed_data.parent / "images")
    batch = LlavaTrimDataCollator.from_processor(build_tiny_next_processor())([dataset[i] for i in range(6)])
    initial, finetuned = tiny_next_model(seed=0), trainer.model.eval()
    with torch.no_grad():
        assert finetuned(**batch).loss < initial(**batch).loss

    saved = load_file(output / "model.safetensors")
    before = initial.state_dict()
    assert saved.keys() == before.keys()
    for name, tensor in saved.items():
        frozen = name.startswith(("model.vision_tower.", "model.trim_scorer."))
        assert torch.equal(tensor, before[name]) == frozen, name
    config = json.loads((output / "config.json").read_text())
    assert config["model_type"] == "llava_next_trim"
    from transformers import AutoProcessor

    assert type(AutoProcessor.from_pretrained(output, trust_remote_code=True)).__name__ == "LlavaNextTrimProcessor"


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--image_aspect_ratio", "pad"], "--image_aspect_ratio pad contradicts the model: LLaVA-NeXT tiles"),
        (["--mm_patch_merge_type", "flat"], "--mm_patch_merge_type flat: the model lays out its tiles"),
        (["--image_grid_pinpoints", "[(336, 672), (672, 336)]"], "is not the model's"),
        (["--image_grid_pinpoints", "336x672"], "expected a list of (height, width) pairs"),
        (["--version", "mistral_instruct"], "--version mistral_instruct: the model's conversation is vicuna_v1"),
        (["--recipe", "llava-v1.5", "--per_device_train_batch_size", "4"], "--recipe llava-v1.5 is LLaVA-1.5's"),
    ],
)
def test_flags_that_contradict_a_next_model_are_refused_in_one_sentence(
    next_dir, mixed_data, tmp_path, flags, message
):
    output = tmp_path / "refused"
    with pytest.raises(SystemExit) as refusal:
        main(next_flags(next_dir, mixed_data, output) + ["--max_steps", "1"] + flags)
    assert str(refusal.value).startswith("error: ") and message in str(refusal.value), str(refusal.value)
    assert "\n" not in str(refusal.value) and not output.exists()


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--image_aspect_ratio", "anyres"], "--image_aspect_ratio anyres: the model is LLaVA-1.5"),
        (["--mm_patch_merge_type", "spatial_unpad"], "the model is LLaVA-1.5, whose features are flat"),
        (["--image_grid_pinpoints", "[(336, 672)]"], "the model is LLaVA-1.5, which does not tile images"),
    ],
)
def test_next_flags_on_a_llava_1_5_model_are_refused(tmp_path, mixed_data, flags, message):
    from llava_trim.testing_utils.tiny import tiny_model
    from llava_trim.testing_utils.tiny_tokenizers import build_tiny_processor

    model_dir = tmp_path / "tiny15"
    tiny_model(seed=0).save_pretrained(model_dir)
    build_tiny_processor().save_pretrained(model_dir)
    output = tmp_path / "refused"
    with pytest.raises(SystemExit) as refusal:
        main(next_flags(model_dir, mixed_data, output) + ["--max_steps", "1"] + flags)
    assert message in str(refusal.value) and not output.exists()


def test_lora_on_a_next_model_adapts_the_language_model_only(processor):
    from llava_trim.tools.finetune import apply_lora

    model = apply_lora(tiny_next_model(seed=0), r=4, alpha=8, dropout=0.0)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert all(("lora_" in name) or ("modules_to_save" in name) for name in trainable)
    assert any(".language_model.layers." in name for name in trainable if "lora_" in name)
    model.train()
    model(**LlavaTrimDataCollator.from_processor(processor)(RECORDS)).loss.backward()
    assert all(p.grad is not None for name, p in model.named_parameters() if "lora_B" in name)


def test_preprocessing_from_separate_folders_tiles_at_the_models_pinpoints(next_dir, mixed_data, tmp_path):
    """--tokenizer / --clip_tokenizer / --image_processor with CLIP's image processor: the collator turns it into
    LLaVA-NeXT's with the model's pinpoints, and the run trains."""
    from llava_trim.testing_utils.tiny_tokenizers import build_clip_image_processor

    image_processor = build_clip_image_processor(tmp_path / "clip_image_processor")
    assert type(image_processor).__name__.startswith("CLIPImageProcessor")
    pieces = ["--tokenizer", str(next_dir), "--clip_tokenizer", str(next_dir / "clip_tokenizer")]
    pieces += ["--image_processor", str(tmp_path / "clip_image_processor"), "--max_steps", "1"]
    trainer = main(next_flags(next_dir, mixed_data, tmp_path / "out") + pieces)
    collator = trainer.data_collator.collator
    assert type(collator) is LlavaNextTrimDataCollator and collator.conversation == "vicuna_v1"
    assert collator.image_processor.image_grid_pinpoints == trainer.model.config.image_grid_pinpoints
    assert trainer.state.global_step == 1
