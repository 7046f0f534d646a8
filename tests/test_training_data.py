"""Training data: the lazy JSON index, bad samples skipped and counted, the modality-grouped sampler."""

import json
import logging

import pytest
import torch
from PIL import Image
from test_finetune import collator, data_dir, preprocessing  # noqa: F401 (fixtures)
from transformers import TrainingArguments

from llava_trim.testing_utils.tiny import tiny_model
from llava_trim.tools.finetune import LlavaTrimTrainer, configure_trainable_parameters
from llava_trim.tools.training_data import (
    BadSampleError,
    LazyJsonRecords,
    LlavaConversationDataset,
    ModalityGroupedSampler,
    SkipBadSamples,
    modality_length,
)


def _records(count: int) -> list[dict]:
    records = []
    for index in range(count):
        record = {
            "id": f"r{index}",
            "conversations": [
                {"from": "human", "value": f'Question {index}: ünïcödé 東京 \\ " {{[,]}}' + " word" * (index % 5)},
                {"from": "gpt", "value": f"Answer {index}."},
            ],
        }
        if index % 3:
            record["image"] = f"{index}.png"
        records.append(record)
    return records


@pytest.mark.parametrize("layout", ["list", "indented list", "lines"])
@pytest.mark.parametrize("chunk_size", [7, 1 << 16])
def test_lazy_records_read_what_json_reads(tmp_path, layout, chunk_size):
    records = _records(40)
    path = tmp_path / "data.json"
    if layout == "lines":
        path.write_text("\n".join(json.dumps(record, ensure_ascii=False) for record in records) + "\n\n")
    else:
        path.write_text(json.dumps(records, ensure_ascii=False, indent=2 if layout == "indented list" else None))
    lazy = LazyJsonRecords(path, chunk_size=chunk_size)  # chunk_size 7 cuts records and characters mid-way
    assert len(lazy) == len(records)
    assert [lazy[index] for index in range(len(lazy))] == records
    assert lazy[-1] == records[-1]
    assert list(lazy.lengths) == [modality_length(record) for record in records]
    with pytest.raises(IndexError):
        lazy[len(records)]


def test_lazy_records_name_a_broken_file(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('[{"conversations": []}, {"conversations": [}]')
    with pytest.raises(ValueError, match="invalid JSON .* at byte 24"):
        LazyJsonRecords(path)
    path.write_text('[{"conversations": []} {"conversations": []}]')
    with pytest.raises(ValueError, match="instead of ','"):
        LazyJsonRecords(path)
    path.write_text('[{"conversations": []}')
    with pytest.raises(ValueError, match="not closed"):
        LazyJsonRecords(path)
    path.write_text('{"conversations": []}\nnot json\n')
    with pytest.raises(ValueError, match="line 2 is not JSON"):
        LazyJsonRecords(path)


def test_modality_length_is_negative_for_text_only_samples():
    text = {"conversations": [{"from": "human", "value": "a b c"}, {"from": "gpt", "value": "d"}]}
    assert modality_length(text) == -4
    assert modality_length({**text, "image": "x.png"}) == 4 + 128


# ---------------------------------------------------------------------------------------------------------------------
# Bad samples
# ---------------------------------------------------------------------------------------------------------------------


@pytest.fixture
def mixed_quality(tmp_path, data_dir):  # noqa: F811
    """Four good records and one of each kind of bad record."""
    good = json.loads((data_dir / "data.json").read_text())[:4]
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    Image.new("RGB", (40, 40)).save(tmp_path / "ok.png")
    long_first_turn = [{"from": "human", "value": "word " * 200}, {"from": "gpt", "value": "Fine."}]
    bad = [
        {"id": "missing", "image": "nowhere.png", "conversations": good[0]["conversations"]},
        {"id": "corrupt", "image": str(tmp_path / "corrupt.png"), "conversations": good[0]["conversations"]},
        {"id": "unanswered", "image": str(tmp_path / "ok.png"), "conversations": good[0]["conversations"][:1]},
        {
            "id": "too long",  # with max_length=700 its image, after the long first exchange, does not fit
            "image": str(tmp_path / "ok.png"),
            "conversations": long_first_turn + good[0]["conversations"],
        },
        {"id": "not a record", "conversation": []},
    ]
    records = [good[0], bad[0], good[1], bad[1], bad[2], good[2], bad[3], good[3], bad[4]]
    path = tmp_path / "mixed.json"
    path.write_text(json.dumps(records))
    return path, data_dir / "images"


def test_dataset_names_bad_samples_or_marks_them_for_skipping(mixed_quality):
    path, images = mixed_quality
    strict = LlavaConversationDataset(path, images)
    assert strict[0]["image"].size == (120, 100)
    for index, message in [(1, "not found"), (3, "cannot be read"), (4, "no answer"), (8, "no `conversations`")]:
        with pytest.raises(BadSampleError, match=message):
            strict[index]
    lenient = LlavaConversationDataset(path, images, skip_bad_samples=True)
    assert [bool(lenient[index].get("skip_reason")) for index in range(len(lenient))] == [
        False,
        True,
        False,
        True,
        True,
        False,
        False,
        False,
        True,
    ]  # fmt: skip  (the too-long record is found by the collator)


def test_bad_samples_are_skipped_counted_and_the_run_goes_on(tmp_path, mixed_quality, collator, caplog):  # noqa: F811
    path, images = mixed_quality
    dataset = LlavaConversationDataset(path, images, skip_bad_samples=True)
    short = type(collator)(collator.tokenizer, collator.clip_tokenizer, collator.image_processor, max_length=700)
    model = tiny_model(seed=0)
    configure_trainable_parameters(model)
    args = TrainingArguments(
        str(tmp_path / "out"),
        max_steps=5,  # 9 records, batch 2: one epoch and one more step
        per_device_train_batch_size=2,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        remove_unused_columns=False,
        use_cpu=True,
        disable_tqdm=True,
        train_sampling_strategy="sequential",
    )
    trainer = LlavaTrimTrainer(model=model, args=args, train_dataset=dataset, data_collator=SkipBadSamples(short))
    with caplog.at_level(logging.WARNING, logger="llava_trim.tools.training_data"):
        trainer.train()
    steps = [entry for entry in trainer.state.log_history if "loss" in entry]
    # sequential batches: [good, missing] [good, corrupt] [unanswered, good] [too long, good] [not a record]: the
    # last one has nothing to learn from, so it is no step (no loss of 0 in the log, no step in the count)
    assert [entry["skipped_samples"] for entry in steps] == [1, 2, 3, 4]
    assert trainer.state.global_step == 4 and trainer.skipped_steps == 1 and trainer.skipped_samples == 5
    losses = [entry["loss"] for entry in steps]
    assert all(loss > 0 for loss in losses)
    (summary,) = [entry for entry in trainer.state.log_history if "train_loss" in entry]
    assert summary["train_loss"] == pytest.approx(sum(losses) / 4, rel=1e-6)  # the mean of the real steps
    assert summary["skipped_samples"] == 5
    skipped = " ".join(record.getMessage() for record in caplog.records)
    for reason in ("not found", "cannot be read", "no answer", "cuts its image", "no `conversations`"):
        assert reason in skipped, reason


def test_skip_bad_samples_keeps_good_rows_as_the_collator_makes_them(mixed_quality, collator):  # noqa: F811
    path, images = mixed_quality
    dataset = LlavaConversationDataset(path, images, skip_bad_samples=True)
    batch = SkipBadSamples(collator, log=lambda message: None)([dataset[index] for index in (0, 1, 2, 3)])
    expected = collator([dataset[0], dataset[2]])
    assert batch.pop("num_skipped_samples") == 2
    assert batch.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(batch[key], value), key


# ---------------------------------------------------------------------------------------------------------------------
# Modality grouping
# ---------------------------------------------------------------------------------------------------------------------


def test_modality_grouped_sampler_keeps_each_step_to_one_modality():
    generator = torch.Generator().manual_seed(0)
    lengths = [int(length) for length in torch.randint(1, 300, (103,), generator=generator)]
    lengths = [length if index % 4 else -length for index, length in enumerate(lengths)]  # 26 text-only samples
    sampler = ModalityGroupedSampler(lengths, group_size=8, seed=3)
    order = list(sampler)
    assert sorted(order) == list(range(len(lengths)))
    assert order == list(ModalityGroupedSampler(lengths, group_size=8, seed=3))  # the same on every process
    sampler.set_epoch(1)
    assert list(sampler) != order
    # 77 image and 26 text-only samples: 9 + 3 full groups of 8, then the 5 + 2 left over together
    groups = [order[start : start + 8] for start in range(0, len(order), 8)]
    modalities = [{lengths[index] > 0 for index in group} for group in groups]
    assert all(len(kinds) == 1 for kinds in modalities[:12])
    assert modalities[12] == {True, False} and len(groups[12]) == 7
    assert [kinds.pop() for kinds in modalities[:12]].count(False) == 3
    for group in groups:  # longest first within a group
        assert [abs(lengths[index]) for index in group] == sorted(
            (abs(lengths[index]) for index in group), reverse=True
        )


def test_trainer_uses_the_modality_grouped_sampler(tmp_path, data_dir):  # noqa: F811
    dataset = LlavaConversationDataset(data_dir / "data.json", data_dir / "images")
    args = TrainingArguments(
        str(tmp_path), per_device_train_batch_size=2, gradient_accumulation_steps=3, use_cpu=True, report_to="none"
    )
    model = tiny_model(seed=0)
    sampler = LlavaTrimTrainer(model=model, args=args, train_dataset=dataset, group_by_modality_length=True)
    sampler = sampler._get_train_sampler()
    assert isinstance(sampler, ModalityGroupedSampler) and sampler.group_size == 6
    assert list(sampler.lengths) == list(dataset.modality_lengths)
    plain = LlavaTrimTrainer(model=model, args=args, train_dataset=dataset)._get_train_sampler()
    assert not isinstance(plain, ModalityGroupedSampler)
