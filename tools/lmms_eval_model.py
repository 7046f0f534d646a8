# Copyright 2026 The llava-trim authors. Licensed under the Apache License, Version 2.0.
"""
lmms-eval adapter: the model `llava_trim`, registered through lmms-eval's `lmms_eval.models` entry-point group by
`pip install "llava-trim[lmms-eval]"`.

```bash
python -m lmms_eval --model llava_trim --model_args pretrained=path/to/llava-v1.5-7b-trim,trim_ratio=-1,batch_size=8 \
    --tasks pope,mme,textvqa_val
accelerate launch --num_processes 8 -m lmms_eval --model llava_trim --model_args pretrained=... --tasks ...
```

`model_args`: `pretrained` (a converted folder or Hub id), `trim_ratio` (`-1`/`auto`: TRIM's automatic rule,
`off`/`none`: plain LLaVA-1.5 or LLaVA-NeXT, or a keep ratio in (0, 1]), `batch_size`, `dtype` (`auto`, `float32`,
`float16`, `bfloat16`), `device` (`auto`: the GPU of the process's local rank, else the CPU). Prompts are LLaVA's: the
images first, then the task's text, in the processor's chat template (`vicuna_v1`; `mistral_instruct` for
llava-v1.6-mistral). A LLaVA-NeXT folder works the same way: its processor adds each image's `image_sizes`, which go
to `generate` with the crops.
"""

import json
import os
import sys

import torch
from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms
from lmms_eval.models.registry_v2 import ModelManifest
from PIL import Image
from tqdm.auto import tqdm

from ..configuration_llava_trim import parse_trim_ratio
from .loading import load_model_and_processor

IMAGE_PLACEHOLDER = "<image>"


def manifest() -> ModelManifest:
    """The entry point lmms-eval loads: the model id `llava_trim` and the class that implements it."""
    return ModelManifest(model_id="llava_trim", simple_class_path=f"{__name__}.LlavaTrim")


class LlavaTrim(lmms):
    """LLaVA-1.5 or LLaVA-NeXT with TRIM for lmms-eval: batched `generate_until` over images and text, one model per
    process."""

    def __init__(
        self,
        pretrained: str,
        trim_ratio: str | float = -1,
        batch_size: int | str = 1,
        dtype: str = "auto",
        device: str = "auto",
        **unknown,
    ) -> None:
        super().__init__()
        if unknown:
            raise ValueError(
                f"Unknown model_args for llava_trim: {', '.join(sorted(unknown))}. It takes pretrained, trim_ratio, "
                "batch_size, dtype and device."
            )
        # lmms-eval parses model_args itself: "-1" may arrive as -1.0, "none" as None
        self.trim_ratio = parse_trim_ratio(str(trim_ratio))
        self.batch_size_per_process = int(batch_size)
        if self.batch_size_per_process < 1:
            raise ValueError(f"batch_size must be at least 1, not {batch_size}.")

        # The launcher (accelerate launch, torchrun) sets these and lmms-eval splits the documents by them. They are
        # read here rather than from an `Accelerator`: lmms-eval creates a bare one first, which on CPU-only
        # machines reports every process as "rank 0 of 1".
        self._rank = int(os.environ.get("RANK", "0"))
        self._world_size = int(os.environ.get("WORLD_SIZE", "1"))
        on_cpu = device == "cpu" or (device in ("auto", "cuda") and not torch.cuda.is_available())
        if device in ("auto", "cuda"):
            device = "cpu" if on_cpu else f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        self._device = torch.device(device)
        self._model, self.processor = load_model_and_processor(pretrained, device, dtype)
        print(
            f"llava_trim: process {self._rank} of {self._world_size} on {self._device}, trim_ratio "
            f"{self.trim_ratio}, batch size {self.batch_size_per_process}",
            file=sys.stderr,
            flush=True,
        )

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> "LlavaTrim":
        """`--model_args` (`pretrained=...,trim_ratio=...,batch_size=...`) with lmms-eval's `--batch_size` and
        `--device` as defaults: a value in `--model_args` wins."""
        from lmms_eval import utils

        args = utils.simple_parse_args_string(arg_string)
        defaults = {key: value for key, value in (additional_config or {}).items() if value is not None}
        if defaults.pop("max_batch_size", None) is not None:
            raise ValueError("llava_trim runs a fixed batch size: pass batch_size, not --max_batch_size.")
        return cls(**{**defaults, **args})

    @property
    def model(self):
        return self._model

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_process

    @property
    def rank(self) -> int:
        return self._rank

    @property
    def world_size(self) -> int:
        return self._world_size

    def prompt(self, context: str, num_images: int) -> str:
        """LLaVA's prompt: the images, then the task's text (its own `<image>` marks removed), as one user turn
        in the processor's chat template."""
        text = context.replace(IMAGE_PLACEHOLDER, "").strip() if num_images else context
        content = [{"type": "image"}] * num_images + [{"type": "text", "text": text}]
        return self.processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)

    def generate_until(self, requests: list[Instance]) -> list[str]:
        """Greedy (or the task's sampling) answers, in batches of `batch_size` requests that share generation
        settings and either all have images or none; each answer cut at the first of the task's `until` strings."""
        answers: list[str | None] = [None] * len(requests)
        groups: dict[tuple[str, bool], list[int]] = {}
        visuals = []
        for index, request in enumerate(requests):
            context, generation_kwargs, doc_to_visual, doc_id, task, split = request.args
            images = doc_to_visual(self.task_dict[task][split][doc_id]) if doc_to_visual is not None else []
            images = [image.convert("RGB") for image in images or [] if isinstance(image, Image.Image)]
            visuals.append(images)
            key = (json.dumps(generation_kwargs, sort_keys=True, default=str), bool(images))
            groups.setdefault(key, []).append(index)

        with tqdm(total=len(requests), disable=self.rank != 0, desc="llava_trim") as bar:
            for indices in groups.values():
                for start in range(0, len(indices), self.batch_size):
                    batch = indices[start : start + self.batch_size]
                    texts = self._generate([requests[i] for i in batch], [visuals[i] for i in batch])
                    for index, text in zip(batch, texts, strict=True):
                        answers[index] = text
                        self.cache_hook.add_partial("generate_until", requests[index].args[:2], text)
                    bar.update(len(batch))
        print(
            f"llava_trim: process {self.rank} of {self.world_size} answered {len(requests)} requests", file=sys.stderr
        )
        return answers

    def _generate(self, requests: list[Instance], visuals: list[list[Image.Image]]) -> list[str]:
        generation_kwargs = dict(requests[0].args[1])
        until = generation_kwargs.pop("until", None) or []
        until = [until] if isinstance(until, str) else list(until)
        temperature = float(generation_kwargs.pop("temperature", 0) or 0)
        do_sample = bool(generation_kwargs.pop("do_sample", False)) and temperature > 0
        sampling = {"temperature": temperature, "top_p": generation_kwargs.pop("top_p", None)} if do_sample else {}
        prompts = [
            self.prompt(request.args[0], len(images)) for request, images in zip(requests, visuals, strict=True)
        ]
        images = [image for row in visuals for image in row]

        tokenizer = self.processor.tokenizer
        inputs = self.processor(text=prompts, images=images or None, padding=True, return_tensors="pt").to(self.device)
        with torch.inference_mode():
            sequences = self.model.generate(
                **inputs,
                trim_ratio=self.trim_ratio,
                max_new_tokens=int(generation_kwargs.pop("max_new_tokens", 128)),
                num_beams=int(generation_kwargs.pop("num_beams", 1) or 1),
                do_sample=do_sample,
                pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
                **sampling,
            )
        texts = tokenizer.batch_decode(sequences[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        return [_cut(text, until).strip() for text in texts]

    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        raise NotImplementedError(
            "llava_trim answers generate_until tasks; loglikelihood (multiple-choice scoring) tasks are not "
            "supported: use the task's generate_until variant."
        )

    def generate_until_multi_round(self, requests: list[Instance]) -> list[str]:
        raise NotImplementedError("llava_trim does not run multi-round lmms-eval tasks.")


def _cut(text: str, until: list[str]) -> str:
    """`text` up to the first occurrence of any stop string."""
    for stop in until:
        if stop:
            text = text.split(stop)[0]
    return text
