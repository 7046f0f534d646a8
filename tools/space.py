# Copyright 2026 The llava-trim authors. Licensed under the Apache License, Version 2.0.
"""Write a Hugging Face Space (Gradio SDK) that runs the LLaVA-TRIM page (`tools/app.py`) on a converted model.

```bash
python -m llava_trim.tools.space --model your-name/llava-v1.5-7b-trim --output llava-trim-space
hf upload your-name/llava-trim-demo llava-trim-space --repo-type space
```

The folder holds `app.py` (starts the page on the model), `requirements.txt` (this package's runtime
dependencies; the Space provides Gradio itself, at the README's `sdk_version`), `README.md` with the Space metadata
(`sdk: gradio`, `app_file: app.py`, ...) and `llava_trim/`, a copy of the modules the page uses, so the Space needs
nothing that is not on PyPI. The model is downloaded by the Space from the Hub: push it first
(`convert_checkpoint.py --push-to-hub`). A 7B model needs a GPU Space (`--hardware`, e.g. `t4-medium`).
"""

import importlib.metadata
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from huggingface_hub.utils import HFValidationError, validate_repo_id

from .cli import command_parser

PACKAGE = "llava_trim"
TOOLS_FOLDER = Path(__file__).resolve().parent
PACKAGE_FOLDER = TOOLS_FOLDER.parent
# What the page imports, copied into the Space as the `llava_trim` package: the model's three files and the tools
# the page uses (`visualize.py` draws the heatmap with the processor's image path, `demo.py` draws the examples,
# `cli.py` builds their command lines).
PACKAGE_MODULES = ("__init__.py", "configuration_llava_trim.py", "modeling_llava_trim.py", "processing_llava_trim.py")
TOOLS_MODULES = ("__init__.py", "app.py", "cli.py", "loading.py", "visualize.py", "demo.py")

SPACE_APP = '''"""Hugging Face Space: the LLaVA-TRIM page on {model}."""

import sys

from {package}.tools.app import main

MODEL = {model!r}

if __name__ == "__main__":
    main(["--model", MODEL, "--host", "0.0.0.0", *sys.argv[1:]])
'''

SPACE_README = """---
title: {title}
emoji: ✂️
colorFrom: indigo
colorTo: yellow
sdk: gradio
sdk_version: {gradio_version}
app_file: app.py
pinned: false
license: apache-2.0
models:
  - {model}
short_description: Ask about a picture; see which image tokens TRIM keeps
{hardware}---

# {heading}

LLaVA-1.5 with TRIM (Token Reduction using CLIP Metric, arXiv 2409.10994) on
[{model}](https://huggingface.co/{model}): ask a question about a picture, watch the answer stream, and see which of
the 576 image patches TRIM kept for the language model, how many, and the prefill time with TRIM against TRIM off.

The page is also an API (`gradio_client`):

```python
from gradio_client import Client, handle_file

client = Client("{space_hint}")
answer, heatmap, kept = client.predict(handle_file("bus.jpg"), "What is the colour of the bus?", "auto",
                                       api_name="/answer")
```

The TRIM mode is `"auto"`, `"off"` or a keep ratio such as `"0.25"`.

Limits: uploads up to 32 MB and 50 million pixels, questions up to 2000 characters, 20 questions per conversation,
answers up to 120 s; one request runs at a time and up to 16 wait their turn (more are refused: "queue is full").
"""


def runtime_requirements() -> list[str]:
    """The package's install requirements (no extras) plus numpy: all the page needs besides Gradio."""
    requirements = importlib.metadata.requires("llava-trim") or []
    requirements = [requirement for requirement in requirements if "extra ==" not in requirement]
    return requirements + ["numpy"]  # the heatmap drawing uses it directly


def check_model_id(model: str) -> None:
    """The Space downloads the model, so it must be a Hub repository id, not a local folder."""
    if Path(model).exists():
        raise ValueError(
            f"--model {model}: this is a local folder; a Space downloads its model from the Hub. Upload it first "
            "(`python convert_checkpoint.py ... --push-to-hub your-name/model`) and pass that repository id."
        )
    try:
        validate_repo_id(model)
    except HFValidationError as error:
        raise ValueError(
            f"--model {model!r} is not a Hub repository id such as 'your-name/llava-v1.5-7b-trim': {error}"
        ) from None
    if "/" not in model:
        raise ValueError(f"--model {model!r}: give the full repository id, 'owner/name'.")


def write_space(
    output: str | Path,
    model: str,
    title: str = "LLaVA-TRIM",
    hardware: str | None = None,
    overwrite: bool = False,
) -> Path:
    """
    Write the Space folder for `model` (a Hub repository id) at `output`.

    The folder is written beside `output` under a temporary name and renamed when complete: a failure leaves nothing.
    An existing `output` is refused unless `overwrite=True`.

    Returns:
        `Path`: the folder written.
    """
    check_model_id(model)
    try:
        gradio_version = importlib.metadata.version("gradio")
    except importlib.metadata.PackageNotFoundError:
        raise ValueError(
            "Gradio is not installed: `pip install 'llava-trim[app]'` (the Space runs that version)."
        ) from None
    output = Path(output).resolve()
    if output.exists() and not overwrite:
        raise FileExistsError(f"{output} exists: pass --overwrite to replace it, or choose another --output.")
    output.parent.mkdir(parents=True, exist_ok=True)

    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}-", dir=output.parent))
    try:
        (staging / "app.py").write_text(SPACE_APP.format(model=model, package=PACKAGE))
        (staging / "requirements.txt").write_text("\n".join(runtime_requirements()) + "\n")
        (staging / "README.md").write_text(
            SPACE_README.format(
                title=json.dumps(title),
                heading=title,
                model=model,
                gradio_version=gradio_version,
                hardware=f"suggested_hardware: {hardware}\n" if hardware else "",
                space_hint="your-name/your-space",
            )
        )
        package = staging / PACKAGE
        (package / "tools").mkdir(parents=True)
        for module in PACKAGE_MODULES:
            shutil.copyfile(PACKAGE_FOLDER / module, package / module)
        for module in TOOLS_MODULES:
            shutil.copyfile(TOOLS_FOLDER / module, package / "tools" / module)
        if output.exists():
            shutil.rmtree(output)
        os.replace(staging, output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return output


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; see `--help`."""
    parser = command_parser(
        "python -m llava_trim.tools.space",
        "Write a Hugging Face Space folder (Gradio) running the LLaVA-TRIM page on a converted model.",
        "python -m llava_trim.tools.space --model your-name/llava-v1.5-7b-trim --output my-space",
    )
    parser.add_argument("--model", required=True, help="Hub repository id of a converted model (owner/name).")
    parser.add_argument("--output", required=True, help="Folder to write (e.g. ./llava-trim-space).")
    parser.add_argument("--title", default="LLaVA-TRIM", help="Space title (default LLaVA-TRIM).")
    parser.add_argument(
        "--hardware", default=None, help="suggested_hardware of the Space, e.g. t4-medium or a10g-small."
    )
    parser.add_argument("--overwrite", action="store_true", help="Replace an existing --output folder.")
    args = parser.parse_args(argv)
    try:
        folder = write_space(args.output, args.model, args.title, args.hardware, args.overwrite)
    except (ValueError, FileExistsError) as error:  # a bad --model, missing Gradio, an existing --output
        raise SystemExit(str(error)) from None
    print(f"Wrote {folder}: " + ", ".join(sorted(path.name for path in folder.iterdir())))
    print(f"Upload it with: hf upload your-name/your-space {folder} --repo-type space")
    return 0


if __name__ == "__main__":
    sys.exit(main())
