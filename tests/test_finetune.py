"""Fine-tuning: the vicuna_v1 prompt, the data collator's labels, Trainer, LoRA and reloading what was saved."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from PIL import Image, ImageDraw
from test_generation_cache import logits_tolerance
from transformers import AutoTokenizer, Trainer, TrainingArguments

from llava_trim.testing_utils.tiny import TINY_IMAGE_TOKEN_ID, TINY_LLAMA, tiny_model
from llava_trim.testing_utils.tiny_tokenizers import (
    build_clip_image_processor,
    build_clip_tokenizer,
    build_llama_tokenizer,
)
from llava_trim.tools.finetune import (
    IGNORE_INDEX,
    LlavaConversationDataset,
    LlavaTrimDataCollator,
    apply_lora,
    build_vicuna_v1_prompt,
    configure_trainable_parameters,
    load_preprocessing,
    parse_args,
)

IMAGE_SEQ_LENGTH = 576
COLOURS = {"red": (220, 30, 30), "blue": (30, 30, 220), "green": (30, 170, 30), "yellow": (230, 210, 40)}


@pytest.fixture(scope="module")
def preprocessing(tmp_path_factory):
    """Tiny tokenizers and CLIP's image processor, saved, with `<image>` and `<pad>` at the tiny model's ids."""
    root = tmp_path_factory.mktemp("preprocessing")
    tokenizer = AutoTokenizer.from_pretrained(build_llama_tokenizer(root / "llama_source"))
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    tokenizer.add_special_tokens({"pad_token": "<pad>"})
    assert tokenizer.convert_tokens_to_ids("<image>") == TINY_IMAGE_TOKEN_ID
    assert tokenizer.pad_token_id == TINY_LLAMA["pad_token_id"]
    tokenizer.save_pretrained(root / "llama")
    clip_dir = build_clip_tokenizer(root / "clip")
    image_processor = build_clip_image_processor(root / "image_processor")
    return {
        "tokenizer": tokenizer,
        "clip_tokenizer": AutoTokenizer.from_pretrained(clip_dir),
        "image_processor": image_processor,
        "dirs": {"llama": root / "llama", "clip": clip_dir, "image_processor": root / "image_processor"},
    }


@pytest.fixture(scope="module")
def collator(preprocessing):
    return LlavaTrimDataCollator(
        preprocessing["tokenizer"], preprocessing["clip_tokenizer"], preprocessing["image_processor"]
    )


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """Eight drawn images (a coloured square or disc on a white canvas of varying width) and LLaVA-format records."""
    root = tmp_path_factory.mktemp("data")
    (root / "images").mkdir()
    records = []
    for index, (name, rgb) in enumerate(list(COLOURS.items()) * 2):
        shape = "square" if index < 4 else "disc"
        image = Image.new("RGB", (120 + 24 * index, 100), (250, 250, 250))
        draw = ImageDraw.Draw(image)
        (draw.rectangle if shape == "square" else draw.ellipse)([12, 10, 92, 90], fill=rgb)
        image.save(root / "images" / f"{index}.png")
        conversations = [
            {"from": "human", "value": f"What is the colour of the {shape}?\n<image>"},
            {"from": "gpt", "value": f"The {shape} is {name}."},
        ]
        if index % 3 == 0:
            conversations += [{"from": "human", "value": "Is it a circle?"}, {"from": "gpt", "value": "No."}]
        records.append({"id": str(index), "image": f"{index}.png", "conversations": conversations})
    (root / "data.json").write_text(json.dumps(records))
    return root


@pytest.fixture(scope="module")
def dataset(data_dir):
    return LlavaConversationDataset(data_dir / "data.json", data_dir / "images")


# ---------------------------------------------------------------------------------------------------------------------
# Prompt and collator
# ---------------------------------------------------------------------------------------------------------------------


def test_vicuna_v1_prompt_is_llava_v1_5s():
    prompt = build_vicuna_v1_prompt(
        [
            {"from": "human", "value": "What is this?\n<image>"},
            {"from": "gpt", "value": "A bus."},
            {"from": "human", "value": "Which colour?"},
            {"from": "gpt", "value": "Red."},
        ]
    )
    expected = (
        "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
        "detailed, and polite answers to the user's questions. USER: <image>\nWhat is this? ASSISTANT: A bus.</s>"
        "USER: Which colour? ASSISTANT: Red.</s>"
    )
    assert prompt.text == expected
    assert [prompt.text[start:end] for start, end in prompt.answer_spans] == ["A bus.</s>", "Red.</s>"]
    assert prompt.questions == ["What is this?", "Which colour?"]
    assert prompt.num_images == 1


def test_prompt_drops_leading_assistant_turn_and_rejects_non_alternating_turns():
    prompt = build_vicuna_v1_prompt(
        [{"from": "gpt", "value": "Hi."}, {"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}],
        system_prompt="S",
    )
    assert prompt.text == "S USER: Q ASSISTANT: A</s>"
    with pytest.raises(ValueError, match="must alternate"):
        build_vicuna_v1_prompt([{"from": "human", "value": "Q"}, {"from": "human", "value": "Q2"}])
    with pytest.raises(ValueError, match="needs `from`"):
        build_vicuna_v1_prompt([{"from": "robot", "value": "Q"}])


def test_collator_labels_two_turn_conversation_token_by_token(preprocessing):
    tokenizer = preprocessing["tokenizer"]
    collator = LlavaTrimDataCollator(
        tokenizer, preprocessing["clip_tokenizer"], preprocessing["image_processor"], system_prompt="A chat."
    )
    example = {
        "image": Image.new("RGB", (64, 48), (200, 10, 10)),
        "conversations": [
            {"from": "human", "value": "What is the colour of the bus?\n<image>"},
            {"from": "gpt", "value": "The bus is red."},
            {"from": "human", "value": "Is there a dog?"},
            {"from": "gpt", "value": "Yes."},
        ],
    }
    # "A chat. USER: <image>\nWhat is the colour of the bus? ASSISTANT: The bus is red.</s>USER: Is there a dog?
    # ASSISTANT: Yes.</s>" in the tiny tokenizer's pieces, the text after the image tokenised on its own as LLaVA's
    # `tokenizer_image_token` does (hence "▁" before the newline); True = supervised (assistant answers and their </s>)
    expected = [
        ("<s>", False), ("▁A", False), ("▁chat", False), (".", False),
        ("▁USER", False), (":", False), ("▁", False), ("<image>", False), ("▁", False), ("<0x0A>", False),
        ("W", False), ("hat", False), ("▁is", False), ("▁the", False), ("▁colour", False), ("▁of", False),
        ("▁the", False), ("▁bus", False), ("?", False),
        ("▁ASSISTANT", False), (":", False),
        ("▁The", True), ("▁bus", True), ("▁is", True), ("▁red", True), (".", True), ("</s>", True),
        ("US", False), ("ER", False), (":", False), ("▁Is", False), ("▁the", False), ("re", False), ("▁a", False),
        ("▁dog", False), ("?", False),
        ("▁ASSISTANT", False), (":", False),
        ("▁Yes", True), (".", True), ("</s>", True),
    ]  # fmt: skip
    expected_ids, expected_labels = [], []
    for piece, supervised in expected:
        token_id = tokenizer.convert_tokens_to_ids(piece)
        assert token_id != tokenizer.unk_token_id, piece
        copies = IMAGE_SEQ_LENGTH if piece == "<image>" else 1
        expected_ids += [token_id] * copies
        expected_labels += [token_id if supervised else IGNORE_INDEX] * copies

    batch = collator([example])
    assert batch["input_ids"][0].tolist() == expected_ids
    assert batch["labels"][0].tolist() == expected_labels
    assert batch["attention_mask"][0].tolist() == [1] * len(expected_ids)
    assert batch["pixel_values"].shape == (1, 3, 336, 336)
    # TRIM's question: the first user turn without the image marker
    question = preprocessing["clip_tokenizer"].decode(batch["trim_input_ids"][0], skip_special_tokens=True)
    assert question.replace(" ", "") == "whatisthecolourofthebus?"
    assert batch["trim_attention_mask"].all()


def test_collator_pads_right_and_gives_trim_rows_only_for_images(preprocessing, collator):
    text_only = {"conversations": [{"from": "human", "value": "Hello!"}, {"from": "gpt", "value": "Sure."}]}
    with_image = {
        "image": Image.new("RGB", (30, 60), (0, 0, 255)),
        "conversations": [
            {"from": "human", "value": "<image>\nWhat animal is shown?"},
            {"from": "gpt", "value": "A cat."},
            {"from": "human", "value": "Is the water calm?"},
            {"from": "gpt", "value": "No."},
        ],
    }
    batch = collator([text_only, with_image])
    lengths = batch["attention_mask"].sum(dim=1)
    assert lengths[0] < lengths[1] == batch["input_ids"].shape[1]
    assert (batch["attention_mask"][0, : lengths[0]] == 1).all()
    assert (batch["attention_mask"][0, lengths[0] :] == 0).all()
    assert (batch["input_ids"][0, lengths[0] :] == preprocessing["tokenizer"].pad_token_id).all()
    assert (batch["labels"][0, lengths[0] :] == IGNORE_INDEX).all()
    assert (batch["input_ids"] == TINY_IMAGE_TOKEN_ID).sum(dim=1).tolist() == [0, IMAGE_SEQ_LENGTH]
    assert batch["pixel_values"].shape[0] == batch["trim_input_ids"].shape[0] == 1

    decode = preprocessing["clip_tokenizer"].decode
    first = decode(batch["trim_input_ids"][0], skip_special_tokens=True).replace(" ", "")
    assert first == "whatanimalisshown?"
    last_collator = LlavaTrimDataCollator(
        collator.tokenizer, collator.clip_tokenizer, collator.image_processor, trim_question="last"
    )
    last = decode(last_collator([with_image])["trim_input_ids"][0], skip_special_tokens=True).replace(" ", "")
    assert last == "isthewatercalm?"


def test_collator_matches_what_the_processor_gives_at_inference(preprocessing, dataset):
    """Training sees the ids, pixels and TRIM question the model's processor produces for the same prompt."""
    from llava_trim.processing_llava_trim import LlavaTrimProcessor

    processor = LlavaTrimProcessor(
        preprocessing["image_processor"], preprocessing["tokenizer"], preprocessing["clip_tokenizer"]
    )
    collator = LlavaTrimDataCollator.from_processor(processor)
    example = dataset[5]  # a 168x100 image: padded to a square on both paths
    batch = collator([example])
    question = example["conversations"][0]["value"].replace("<image>", "").strip()
    prompt = f"{collator.system_prompt} USER: <image>\n{question} ASSISTANT:"
    inference = processor(images=[example["image"]], text=prompt, return_tensors="pt")

    prompt_length = inference["input_ids"].shape[1]
    assert torch.equal(batch["input_ids"][0, :prompt_length], inference["input_ids"][0])
    assert (batch["labels"][0, :prompt_length] == IGNORE_INDEX).all()  # the answer starts right after the prompt
    assert batch["labels"][0, prompt_length] != IGNORE_INDEX
    assert torch.equal(batch["pixel_values"], inference["pixel_values"])  # the same image processor
    question_length = int(batch["trim_attention_mask"].sum())
    assert torch.equal(batch["trim_input_ids"][0], inference["trim_input_ids"][0, :question_length])


def test_collator_question_is_the_turn_that_carries_the_image(preprocessing, collator):
    """The processor's rule: an image shown in a later turn is scored against that turn's text, not the first's."""
    record = {
        "image": Image.new("RGB", (40, 30), (0, 200, 0)),
        "conversations": [
            {"from": "human", "value": "Hello!"},
            {"from": "gpt", "value": "Hi."},
            {"from": "human", "value": "What colour is this?\n<image>"},
            {"from": "gpt", "value": "Green."},
        ],
    }
    question = preprocessing["clip_tokenizer"].decode(
        collator([record])["trim_input_ids"][0], skip_special_tokens=True
    )
    assert question.replace(" ", "") == "whatcolouristhis?"


def test_collator_errors_name_the_problem(preprocessing, collator):
    image = Image.new("RGB", (8, 8))
    no_marker = {"image": image, "conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}]}
    with pytest.raises(ValueError, match="exactly one '<image>'"):
        collator([no_marker])
    plain = AutoTokenizer.from_pretrained(preprocessing["dirs"]["clip"])  # has no <image> token
    with pytest.raises(ValueError, match="no '<image>' token"):
        LlavaTrimDataCollator(plain, preprocessing["clip_tokenizer"], preprocessing["image_processor"])
    conversation = [{"from": "human", "value": "<image>\nQ"}, {"from": "gpt", "value": "A long answer."}]
    full = collator([{"image": image, "conversations": conversation}])["input_ids"][0].tolist()
    image_start = full.index(TINY_IMAGE_TOKEN_ID)
    image_end = image_start + IMAGE_SEQ_LENGTH
    for limit in (image_start, image_start + 100, image_end - 1):  # before, inside, one short of the image's end
        short = LlavaTrimDataCollator(
            collator.tokenizer, collator.clip_tokenizer, collator.image_processor, max_length=limit
        )
        with pytest.raises(ValueError, match="cuts its image"):
            short([{"image": image, "conversations": conversation}])
    short.max_length = len(full) - 2  # cuts the answer only: allowed
    assert short([{"image": image, "conversations": conversation}])["input_ids"].shape[1] == len(full) - 2


# ---------------------------------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------------------------------


def _training_args(tmp_path, steps: int, **overrides) -> TrainingArguments:
    fields = {
        "output_dir": str(tmp_path / "trainer"),
        "max_steps": steps,
        "per_device_train_batch_size": 2,
        "learning_rate": 1e-3,
        "logging_steps": 5,
        "save_strategy": "no",
        "report_to": "none",
        "remove_unused_columns": False,
        "use_cpu": True,
        "seed": 0,
        "disable_tqdm": True,
    }
    fields.update(overrides)
    return TrainingArguments(**fields)


def _mean_loss(model, batch) -> float:
    model.eval()
    with torch.no_grad():
        loss = model(**batch).loss.item()
    model.train()
    return loss


def test_default_freezing_trains_projector_and_language_model_only():
    model = tiny_model(seed=0).requires_grad_(True)  # as a loaded transformers model is: nothing frozen
    trainable = configure_trainable_parameters(model)
    for name, parameter in model.named_parameters():
        expected = name.startswith(("model.multi_modal_projector.", "model.language_model.", "lm_head."))
        assert parameter.requires_grad == expected, name
    assert trainable == sum(
        p.numel()
        for m in (model.model.multi_modal_projector, model.model.language_model, model.lm_head)
        for p in m.parameters()
    )
    assert configure_trainable_parameters(model, train_language_model=False) == sum(
        p.numel() for p in model.model.multi_modal_projector.parameters()
    )


def test_trainer_30_steps_lower_the_loss_and_leave_frozen_towers_untouched(tmp_path, dataset, collator):
    model = tiny_model(seed=0)
    configure_trainable_parameters(model)
    initial = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    full_batch = collator([dataset[i] for i in range(len(dataset))])
    loss_before = _mean_loss(model, full_batch)

    trainer = Trainer(
        model=model, args=_training_args(tmp_path, steps=30), train_dataset=dataset, data_collator=collator
    )
    trainer.train()

    loss_after = _mean_loss(model, full_batch)
    logged = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert loss_after < 0.8 * loss_before, (loss_before, loss_after)
    assert logged[-1] < logged[0], logged
    for name, tensor in model.state_dict().items():
        frozen = name.startswith(("model.vision_tower.", "model.trim_scorer."))
        assert torch.equal(tensor, initial[name]) == frozen, name


def test_lora_changes_only_adapter_weights(tmp_path, dataset, collator):
    model = apply_lora(tiny_model(seed=0), r=8, alpha=16, dropout=0.0)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(("lora_" in name) or ("modules_to_save" in name) for name in trainable)
    lora_names = [name for name in trainable if "lora_" in name]
    assert lora_names and all(".language_model.layers." in name for name in lora_names)  # no CLIP tower adapters
    initial = {name: tensor.clone() for name, tensor in model.state_dict().items()}

    trainer = Trainer(
        model=model, args=_training_args(tmp_path, steps=6), train_dataset=dataset, data_collator=collator
    )
    trainer.train()

    for name, tensor in model.state_dict().items():
        is_adapter = "lora_B" in name or "modules_to_save" in name
        if is_adapter:
            assert not torch.equal(tensor, initial[name]), f"{name} did not train"
        elif "lora_A" not in name:  # lora_A may or may not move; every base weight must not
            assert torch.equal(tensor, initial[name]), f"{name} changed"


def test_gradient_checkpointing_gives_the_same_gradients(dataset, collator):
    batch = collator([dataset[0], dataset[3]])
    gradients = []
    for checkpointing in (False, True):
        model = tiny_model(seed=0)
        configure_trainable_parameters(model)
        model.train()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model(**batch).loss.backward()
        gradients.append({name: p.grad for name, p in model.named_parameters() if p.requires_grad})
    assert gradients[0].keys() == gradients[1].keys()
    for name, gradient in gradients[0].items():
        assert torch.equal(gradients[1][name], gradient), name  # checkpointing recomputes the same operations


def test_preprocessing_from_separate_folders(preprocessing):
    dirs = preprocessing["dirs"]
    args = parse_args(
        ["--model", "unused", "--data", "d.json", "--output", "out", "--tokenizer", str(dirs["llama"])]
        + ["--clip-tokenizer", str(dirs["clip"]), "--image-processor", str(dirs["image_processor"])]
    )
    processor, (tokenizer, clip_tokenizer, image_processor) = load_preprocessing(args, "unused")
    assert processor is None
    assert tokenizer.convert_tokens_to_ids("<image>") == TINY_IMAGE_TOKEN_ID
    assert clip_tokenizer.eos_token == "<|endoftext|>" and image_processor.crop_size["height"] == 336
    args.model.image_processor = None
    with pytest.raises(ValueError, match="all three"):
        load_preprocessing(args, "unused")


def test_command_line_lora_run_reloads_through_auto_classes_in_a_fresh_process(
    tmp_path, preprocessing, data_dir, dataset, collator
):
    from llava_trim.processing_llava_trim import LlavaTrimProcessor

    model_dir, output = tmp_path / "tiny", tmp_path / "finetuned"
    initial = tiny_model(seed=0)
    initial.save_pretrained(model_dir)
    LlavaTrimProcessor(
        preprocessing["image_processor"], preprocessing["tokenizer"], preprocessing["clip_tokenizer"]
    ).save_pretrained(model_dir)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    command = [
        sys.executable, "-m", "llava_trim.tools.finetune",
        "--model", str(model_dir), "--data", str(data_dir / "data.json"),
        "--image-folder", str(data_dir / "images"), "--output", str(output),
        "--lora", "--lora-r", "8", "--lora-alpha", "16", "--gradient-checkpointing",
        "--max-steps", "3", "--batch-size", "2", "--learning-rate", "1e-3", "--warmup-ratio", "0",
    ]  # fmt: skip
    run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stderr[-3000:]
    assert (output / "lora_adapter" / "adapter_config.json").is_file()
    assert (output / "modeling_llava_trim.py").is_file()

    batch = collator([dataset[1], dataset[6]])
    torch.save(dict(batch), tmp_path / "batch.pt")
    reload = textwrap.dedent(
        f"""
        import torch
        from transformers import AutoModelForImageTextToText, AutoProcessor
        torch.set_num_threads({torch.get_num_threads()})  # this process's split of the sums: the same bits
        model = AutoModelForImageTextToText.from_pretrained({str(output)!r}, trust_remote_code=True).eval()
        assert type(AutoProcessor.from_pretrained({str(output)!r}, trust_remote_code=True)).__name__ == (
            "LlavaTrimProcessor"
        )
        batch = torch.load({str(tmp_path / "batch.pt")!r}, weights_only=True)
        with torch.no_grad():
            out = model(**batch)
        torch.save({{"logits": out.logits, "loss": out.loss, "class": type(model).__name__,
                     "state": model.state_dict()}}, {str(tmp_path / "reloaded.pt")!r})
        """
    )
    run = subprocess.run([sys.executable, "-c", reload], env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    reloaded = torch.load(tmp_path / "reloaded.pt", weights_only=True)
    assert reloaded["class"] == "LlavaTrimForConditionalGeneration"
    assert torch.isfinite(reloaded["loss"])

    # LoRA merged into the decoder and the projector trained; the vision tower and TRIM's scorer untouched
    state, before = reloaded["state"], initial.state_dict()
    assert state.keys() == before.keys()
    for name, tensor in state.items():
        trained = name.startswith("model.multi_modal_projector.") or (
            ".language_model.layers." in name and name.endswith("_proj.weight")
        )
        assert torch.equal(tensor, before[name]) != trained, name
    # and the fresh process computes what the saved weights compute here
    initial.load_state_dict(state)
    with torch.no_grad():
        expected = initial.eval()(**batch)
    # the same weights (checked above, bit for bit) and operations, but another process may split and vectorise the
    # float32 sums differently (thread pools, memory alignment): within the drift of a reordered float32 run
    tolerance = logits_tolerance(initial, expected.logits, batch["input_ids"].shape[1])
    assert (reloaded["logits"] - expected.logits).abs().max() <= tolerance
