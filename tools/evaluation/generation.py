# Copyright 2026 The llava-trim authors. Licensed under the Apache License, Version 2.0.
"""LLaVA-1.5's prompt for one question, batched greedy generation with timing, and the answer records."""

import time
from collections.abc import Iterable, Sequence

import torch
from PIL import Image
from tqdm.auto import tqdm
from transformers.generation.streamers import BaseStreamer

from ...processing_llava_trim import single_turn_messages
from .answers import AnswerFile, Setting, new_answer_id
from .questions import has_image, question_image


def build_prompt(processor, question: str, with_image: bool = True) -> str:
    """LLaVA-1.5's prompt for one question: the image (if any), then the question, in the processor's chat template
    (LLaVA's `vicuna_v1` conversation), from the processor's own single-turn chat."""
    if not getattr(processor, "chat_template", None):
        raise ValueError(
            "The processor has no chat template, so LLaVA-1.5's prompt cannot be built. Convert the checkpoint with "
            "llava_trim's convert_checkpoint.py, which saves the vicuna_v1 template with the processor."
        )
    messages = single_turn_messages(question)
    if not with_image:  # ScienceQA's text-only questions: the same turn without its image entry
        messages[0]["content"] = [entry for entry in messages[0]["content"] if entry["type"] != "image"]
    return processor.apply_chat_template(messages, add_generation_prompt=True)


class FirstTokenTimer(BaseStreamer):
    """A `generate` streamer that only records when the first new token arrives (the prompt comes first)."""

    def __init__(self):
        self.calls = 0
        self.first_token_time: float | None = None

    def put(self, value: torch.Tensor) -> None:
        self.calls += 1
        if self.calls == 2:
            self.first_token_time = time.perf_counter()

    def end(self) -> None:
        pass


def _num_new_tokens(tokens: torch.Tensor, eos_token_ids: set[int]) -> int:
    """Generated tokens of one row up to and including the first end-of-sequence token."""
    for position, token in enumerate(tokens.tolist()):
        if token in eos_token_ids:
            return position + 1
    return tokens.shape[0]


def generate_answers(
    model,
    processor,
    questions: Sequence[dict],
    images: Sequence[Image.Image] | None,
    trim_ratio: float | None,
    max_new_tokens: int = 128,
) -> tuple[list[dict], dict]:
    """
    Answer a batch of questions with greedy decoding: one image each, or (`images=None`) text only.

    Returns:
        `(answers, timing)`: per question a dict with `text`, `num_kept`, `num_patches`, `image_tokens` (LLM positions
        of its image; absent for text-only questions) and `num_new_tokens`; `timing` with the batch's
        `batch_seconds` (processor to last token) and `ttft_seconds` (processor to first new token).
    """
    tokenizer = processor.tokenizer
    prompts = [build_prompt(processor, question["text"], with_image=images is not None) for question in questions]
    eos = model.generation_config.eos_token_id
    eos_token_ids = set(eos if isinstance(eos, list) else [eos]) if eos is not None else {tokenizer.eos_token_id}
    pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(eos_token_ids)

    timer = FirstTokenTimer()
    start = time.perf_counter()
    image_kwargs = {"images": list(images)} if images is not None else {}
    inputs = processor(text=prompts, padding=True, return_tensors="pt", **image_kwargs).to(model.device)
    with torch.inference_mode():
        outputs = model.generate(
            **inputs,
            trim_ratio=trim_ratio,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            num_beams=1,
            pad_token_id=pad_token_id,
            return_dict_in_generate=True,
            streamer=timer,
        )
    new_tokens = outputs.sequences[:, inputs["input_ids"].shape[1] :].cpu()  # (batch, new_length)
    end = time.perf_counter()

    texts = tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
    answers = [
        {"text": text.strip(), "num_new_tokens": _num_new_tokens(new_tokens[row], eos_token_ids)}
        for row, text in enumerate(texts)
    ]
    selection = outputs.get("trim_selection") if images is not None else None
    if selection is not None:
        num_kept, image_tokens = selection.num_kept.tolist(), selection.tokens_per_image.tolist()
        candidates = selection.candidates_per_image.tolist()  # 576 for LLaVA-1.5; per image for LLaVA-NeXT
        for row, answer in enumerate(answers):
            answer.update(num_kept=num_kept[row], num_patches=candidates[row], image_tokens=image_tokens[row])
    first_token = timer.first_token_time if timer.first_token_time is not None else end
    return answers, {"batch_seconds": end - start, "ttft_seconds": first_token - start}


def answer_record(
    question: dict, answer: dict, setting: Setting, model_id: str, timing: dict, batch: int, generation: dict
) -> dict:
    """One line of a LLaVA answer file: `question_id`, `prompt`, `text`, the benchmark's extra fields (MMBench's
    `round_id`, `options`, `option_char`), `answer_id`, `model_id` and our `metadata` (the setting, what TRIM kept,
    the timing and the `generation` options the answer depends on)."""
    extra = dict(question.get("answer_fields") or {})
    record = {"question_id": question["question_id"]}
    if "round_id" in extra:
        record["round_id"] = extra.pop("round_id")
    record.update(prompt=question["prompt"], text=answer.pop("text"), **extra)
    record.update(
        answer_id=new_answer_id(),
        model_id=model_id,
        metadata={
            "setting": setting.name,
            "trim_ratio": setting.trim_ratio,
            **generation,
            **answer,
            "batch_size": batch,
            "batch_seconds": timing["batch_seconds"],
            "ttft_seconds": timing["ttft_seconds"],
        },
    )
    return record


def error_record(question: dict, error: str, setting: Setting, model_id: str, generation: dict) -> dict:
    """The answer-file line of a question that could not be answered: an empty `text` and the one-sentence `error`,
    with the setting and `generation` options in `metadata` as for an answer (so a resumed run accepts it)."""
    extra = dict(question.get("answer_fields") or {})
    record = {"question_id": question["question_id"]}
    if "round_id" in extra:
        record["round_id"] = extra.pop("round_id")
    record.update(prompt=question["prompt"], text="", **extra)
    record.update(
        answer_id=new_answer_id(),
        model_id=model_id,
        error=error,
        metadata={"setting": setting.name, "trim_ratio": setting.trim_ratio, **generation},
    )
    return record


def read_images(batch: Sequence[dict]) -> tuple[list[Image.Image | None], list[str | None]]:
    """The image of each question of `batch` (`None` for text-only ones), or, where it cannot be read, the reason."""
    images, errors = [], []
    for question in batch:
        try:
            images.append(question_image(question))
            errors.append(None)
        except ValueError as error:
            images.append(None)
            errors.append(str(error))
    return images, errors


def batches(questions: Sequence[dict], batch_size: int) -> Iterable[list[dict]]:
    """Consecutive questions in batches of at most `batch_size`; image and text-only questions never share one."""
    batch: list[dict] = []
    for question in questions:
        with_image = has_image(question)
        if batch and (len(batch) == batch_size or has_image(batch[0]) != with_image):
            yield batch
            batch = []
        batch.append(question)
    if batch:
        yield batch


def run_setting(
    model,
    processor,
    questions: Sequence[dict],
    setting: Setting,
    answer_file: AnswerFile,
    model_id: str,
    generation: dict,
    batch_size: int = 1,
    progress: bool = True,
) -> int:
    """Answer every question of `questions` (in order), batch by batch, into `answer_file`; return how many lines
    were written.

    A question whose image cannot be read (not an image Pillow reads, over the pixel limit, a decompression bomb)
    gets an [`error_record`] instead of an answer, and the rest of its batch is answered without it.
    `generation` holds `max_new_tokens` (and the other options recorded with each answer, such as `dtype`)."""
    added = 0
    with tqdm(total=len(questions), desc=f"TRIM {setting.name}", unit="q", disable=not progress) as bar:
        for batch in batches(questions, batch_size):
            with_image = has_image(batch[0])
            images, errors = read_images(batch) if with_image else ([None] * len(batch), [None] * len(batch))
            readable = [row for row, error in enumerate(errors) if error is None]
            answers, timing = [], {}
            if readable:
                answers, timing = generate_answers(
                    model,
                    processor,
                    [batch[row] for row in readable],
                    [images[row] for row in readable] if with_image else None,
                    setting.trim_ratio,
                    generation["max_new_tokens"],
                )
            answer_of = dict(zip(readable, answers, strict=True))
            for row, question in enumerate(batch):  # in question order
                if errors[row] is not None:
                    record = error_record(question, errors[row], setting, model_id, generation)
                else:
                    record = answer_record(
                        question, answer_of[row], setting, model_id, timing, len(readable), generation
                    )
                answer_file.write(record)
                added += 1
            bar.update(len(batch))
    return added
