# Copyright 2026 The llava-trim authors. Licensed under the Apache License, Version 2.0.
"""The offline demo (`make demo`): a tiny LLaVA-1.5 checkpoint, converted, then used through the pipeline.

1. Builds a tiny random checkpoint in the original `liuhaotian/llava-v1.5-7b` format and a tiny full CLIP (the
   `openai/clip-vit-large-patch14-336` layout: 336 px, 576 patches), locally and without network.
2. Converts them with `convert_checkpoint.py` in a subprocess, exactly as a user would (`--verify` included).
3. In a fresh process, loads the result with `pipeline("image-text-to-text", trust_remote_code=True)`, asks a
   question about a locally drawn image and prints the answer, how many of the 576 image tokens TRIM kept, and the
   prefill time with TRIM off and on.

The weights are random, so the answer is nonsense by design; the point is the whole path. With network, the same
steps run on real checkpoints (`--llava liuhaotian/llava-v1.5-7b`): see the README.

`--family next` does the same with a tiny LLaVA-NeXT (`liuhaotian/llava-v1.6-vicuna-7b` layout: an overview and up
to four tiles, up to 2,928 image positions).

```bash
python -m llava_trim.tools.demo               # everything in a temporary folder, removed afterwards
python -m llava_trim.tools.demo --keep ./demo-output
python -m llava_trim.tools.demo --family next # LLaVA-NeXT (`make demo-next`)
```
"""

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

QUESTION = "What is the colour of the bus?"


def draw_scene():
    """A 640x480 picture drawn with PIL: sky, sun, road, a red bus with windows and wheels, a tree."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (640, 480), (120, 180, 235))
    draw = ImageDraw.Draw(image)
    draw.ellipse((520, 30, 600, 110), fill=(255, 215, 60))
    draw.rectangle((0, 330, 640, 480), fill=(90, 90, 95))
    draw.rectangle((0, 300, 640, 330), fill=(70, 160, 70))
    draw.rectangle((120, 190, 470, 330), fill=(205, 30, 35))  # the bus
    for x in range(140, 440, 60):
        draw.rectangle((x, 210, x + 40, 250), fill=(200, 230, 250))
    for x in (170, 410):
        draw.ellipse((x - 28, 305, x + 28, 361), fill=(25, 25, 25))
    draw.rectangle((40, 200, 60, 310), fill=(110, 70, 30))
    draw.ellipse((0, 130, 100, 230), fill=(40, 130, 50))
    return image


def _step(title: str) -> None:
    print(f"\n=== {title}", flush=True)


def build_and_convert(workdir: Path, family: str = "llava") -> Path:
    """Steps 1 and 2: tiny sources in `workdir`, converted by `convert_checkpoint.py` in a subprocess."""
    from ..testing_utils.tiny_checkpoints import build_original_llava, build_tiny_clip
    from ..testing_utils.tiny_next import build_original_llava_next

    name = "LLaVA-NeXT" if family == "next" else "LLaVA-1.5"
    _step(f"1/3 Building a tiny random {name} checkpoint (original liuhaotian format) and a tiny CLIP, offline")
    clip_dir = build_tiny_clip(workdir / "clip-vit-large-patch14-336")
    if family == "next":
        llava_dir = build_original_llava_next(workdir / "llava-v1.6-vicuna-7b", clip_dir)
    else:
        llava_dir = build_original_llava(workdir / "llava-v1.5-7b")
    for folder in (llava_dir, clip_dir):
        files = sorted(p.name for p in folder.iterdir())
        print(f"{folder}: {', '.join(files)}")

    _step("2/3 Converting with convert_checkpoint.py")
    output = workdir / f"{llava_dir.name}-trim"
    command = [
        sys.executable,
        "-m",
        "llava_trim.convert_checkpoint",
        "--llava",
        str(llava_dir),
        "--clip",
        str(clip_dir),
        "--output",
        str(output),
        "--verify",
    ]
    print("$ " + " ".join(["python", *command[1:]]), flush=True)
    subprocess.run(command, check=True)
    return output


def run_converted(model_dir: Path, question: str = QUESTION, repeats: int = 5) -> None:
    """Step 3, meant for a fresh process: pipeline answer, TRIM's kept tokens, prefill time with TRIM off and on."""
    import torch
    from transformers import pipeline

    _step(f"3/3 Loading {model_dir} in a fresh process with pipeline(..., trust_remote_code=True)")
    pipe = pipeline("image-text-to-text", model=str(model_dir), trust_remote_code=True)
    model, processor = pipe.model, pipe.processor
    image = draw_scene()
    messages = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": question}]}]
    answer = pipe(text=messages, max_new_tokens=20, return_full_text=False)[0]["generated_text"]
    print(f"Question: {question}")
    print(f"Answer:   {answer!r}")
    print("          (the weights are random, so the answer is nonsense by design: the demo shows the path)")

    inputs = processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    selection = model.select_image_tokens(**inputs)
    kept = selection.num_kept.tolist()
    newlines = "" if selection.num_newlines is None else f", {selection.num_newlines.tolist()} newline(s)"
    print(
        f"TRIM (trim_ratio={model.config.trim_ratio}) kept {kept} image token(s) per image out of "
        f"{selection.candidates_per_image.tolist()}{newlines}, plus one aggregate token each"
    )

    def median_ms(run) -> float:
        times = []
        with torch.no_grad():
            for _ in range(repeats + 1):  # the first run warms up
                start = time.perf_counter()
                run()
                times.append(time.perf_counter() - start)
        return statistics.median(times[1:]) * 1000

    print(f"Prefill time (median of {repeats} runs, CPU, {torch.get_num_threads()} threads):")
    print("             whole forward   language model only   language-model positions")
    for label, trim_ratio in (("TRIM off", None), ("TRIM on", model.config.trim_ratio)):
        with torch.no_grad():
            trimmed = model.model.prepare_trimmed_inputs(
                inputs["input_ids"],
                inputs["pixel_values"],
                inputs["attention_mask"],
                inputs["trim_input_ids"],
                inputs["trim_attention_mask"],
                trim_ratio=trim_ratio,
                image_sizes=inputs.get("image_sizes"),
            )
            sequence = trimmed.sequence
            # the language model's input: token embeddings with the trimmed image features in the placeholders
            image_mask = (sequence.input_ids == model.config.image_token_id).unsqueeze(-1)
            embeds = model.get_input_embeddings()(sequence.input_ids)
            embeds = embeds.masked_scatter(image_mask, torch.cat(trimmed.image_outputs.pooler_output))

        def language_model(embeds=embeds, sequence=sequence):
            hidden = model.model.language_model(
                inputs_embeds=embeds,
                attention_mask=sequence.attention_mask,
                position_ids=sequence.position_ids,
            ).last_hidden_state
            return model.lm_head(hidden)

        whole = median_ms(lambda trim_ratio=trim_ratio: model(**inputs, trim_ratio=trim_ratio))
        llm = median_ms(language_model)
        positions = sequence.input_ids.shape[1]
        print(f"  {label:<9}  {whole:9.1f} ms       {llm:9.1f} ms          {positions:6d}")
    print(
        "  Timings on a shared CPU are noisy, and this language model is tiny (2 layers, width 64) next to the CLIP "
        "towers TRIM runs; in LLaVA-1.5-7B the 7B language model dominates the prefill, and it shrinks with the "
        "positions."
    )


def main(argv: list[str] | None = None) -> None:
    from .cli import command_parser

    parser = command_parser(
        "python -m llava_trim.tools.demo",
        "Offline demo: build a tiny LLaVA-1.5 checkpoint, convert it, run the pipeline with TRIM.",
        "python -m llava_trim.tools.demo --keep ./demo-output",
    )
    parser.add_argument("--keep", type=Path, default=None, help="Folder to build in and keep (e.g. ./demo-output).")
    parser.add_argument("--question", default=QUESTION, help=f"Question about the image (e.g. {QUESTION!r}).")
    parser.add_argument(
        "--family", choices=["llava", "next"], default="llava", help="LLaVA-1.5 (llava, default) or LLaVA-NeXT (next)."
    )
    parser.add_argument("--run", type=Path, default=None, help=argparse.SUPPRESS)  # step 3 only, in a fresh process
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.run is not None:
        run_converted(args.run, args.question)
        return

    with tempfile.TemporaryDirectory(prefix="llava-trim-demo-") as tmp:
        workdir = Path(tmp) if args.keep is None else args.keep.resolve()
        if args.keep is not None and workdir.exists() and any(workdir.iterdir()):
            parser.error(f"--keep {workdir} exists and is not empty: pass a new folder.")
        workdir.mkdir(parents=True, exist_ok=True)
        output = build_and_convert(workdir, args.family)
        command = [sys.executable, "-m", "llava_trim.tools.demo", "--run", str(output), "--question", args.question]
        subprocess.run(command, check=True)
    print("\nDone." + (f" Files kept in {workdir}." if args.keep is not None else ""))


if __name__ == "__main__":
    main()
