"""The transformers releases the model repository supports: the oldest one gives the pinned one's tokens, older
ones are refused at import with one sentence, and every place that states the minimum states the same one.

`make test` (so CI) builds a second environment with the project's torch and the oldest supported transformers
(`make install-oldest-transformers`) and names its python in `LLAVA_TRIM_OLDEST_TRANSFORMERS_PYTHON`: there, and
wherever `CI` is set, a missing environment fails. Elsewhere the comparison is skipped when the environment is absent.
"""

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from PIL import Image
from safetensors.torch import load_file

from llava_trim.conversion.write import CODE_FILES, MIN_TRANSFORMERS_VERSION

REPO_ROOT = Path(__file__).resolve().parents[1]
MAJOR_MINOR = ".".join(MIN_TRANSFORMERS_VERSION.split(".")[:2])  # "5.24": the code files compare major.minor
OLDEST_PYTHON_VARIABLE = "LLAVA_TRIM_OLDEST_TRANSFORMERS_PYTHON"
REFUSAL = (
    f"LLaVA-TRIM needs transformers >= {MAJOR_MINOR} and found {{found}}: "
    f'run `pip install -U "transformers>={MAJOR_MINOR},<6"`.'
)

# Runs in a fresh interpreter of either environment, importing only torch, transformers and the repository's own code
# (trust_remote_code): load, processor, then greedy generation with TRIM off, automatic and fixed at 0.25.
SMOKE = """
import json, sys
import transformers
from PIL import Image
from safetensors.torch import save_file
from transformers import AutoModelForImageTextToText, AutoProcessor

folder, image, output = sys.argv[1:4]
model = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True)
processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
messages = [{"role": "user", "content": [
    {"type": "image", "image": Image.open(image)}, {"type": "text", "text": "What is the colour of the bus?"}
]}]
inputs = processor.apply_chat_template(
    messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
)
tensors = {f"inputs.{name}": value.contiguous() for name, value in inputs.items()}
for name, trim_ratio in (("off", None), ("auto", -1), ("fixed", 0.25)):
    tensors[f"generated.{name}"] = model.generate(**inputs, max_new_tokens=8, do_sample=False, trim_ratio=trim_ratio)
    if trim_ratio is not None:
        tensors[f"kept.{name}"] = model.select_image_tokens(**inputs, trim_ratio=trim_ratio).num_kept
save_file(tensors, output)
print(json.dumps({"transformers": transformers.__version__}))
"""


def _run_smoke(python: str, model_dir: Path, image: Path, output: Path) -> str:
    """Run `SMOKE` with `python` in a clean environment (offline, no PYTHONPATH); return its transformers version."""
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS=env.get("OMP_NUM_THREADS", "1"))
    result = subprocess.run(
        [python, "-c", SMOKE, str(model_dir), str(image), str(output)],
        capture_output=True,
        text=True,
        env=env,
        cwd=output.parent,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])["transformers"]


def _oldest_python() -> str:
    """The oldest-transformers environment's python; a skip where it is absent, a failure where CI requires it."""
    required = OLDEST_PYTHON_VARIABLE in os.environ or bool(os.environ.get("CI"))
    default = REPO_ROOT / f".venv-transformers-{MIN_TRANSFORMERS_VERSION}" / "bin" / "python"
    python = Path(os.environ.get(OLDEST_PYTHON_VARIABLE) or default).absolute()  # not resolve(): keep the venv's link
    if not python.is_file():
        message = f"no python at {python}: `make install-oldest-transformers` builds that environment"
        if required:
            pytest.fail(message)
        pytest.skip(message)
    return str(python)


def test_the_oldest_supported_transformers_gives_the_same_processor_outputs_and_tokens(model_dir, tmp_path):
    python = _oldest_python()
    image = tmp_path / "image.png"
    torch.manual_seed(0)
    Image.fromarray((torch.rand(300, 400, 3) * 255).to(torch.uint8).numpy()).save(image)

    oldest_version = _run_smoke(python, model_dir, image, tmp_path / "oldest.safetensors")
    pinned_version = _run_smoke(sys.executable, model_dir, image, tmp_path / "pinned.safetensors")
    assert oldest_version == MIN_TRANSFORMERS_VERSION
    assert pinned_version == transformers.__version__

    oldest, pinned = load_file(tmp_path / "oldest.safetensors"), load_file(tmp_path / "pinned.safetensors")
    assert oldest.keys() == pinned.keys()
    assert {"inputs.pixel_values", "inputs.trim_input_ids", "generated.off", "generated.fixed"} <= pinned.keys()
    for name in pinned:  # the same torch on both sides: the same operations give the same bits
        assert torch.equal(oldest[name], pinned[name]), name
    # the comparison covers TRIM: the fixed ratio keeps floor(576 * 0.25) tokens, and the answers differ from off
    assert pinned["kept.fixed"].tolist() == [144]
    assert not torch.equal(pinned["generated.off"], pinned["generated.fixed"])


@pytest.mark.parametrize("found", ["4.57.6", "5.19.0", "5.23.2"])
@pytest.mark.parametrize("code_file", CODE_FILES)
def test_an_older_transformers_is_refused_at_import_with_one_sentence(monkeypatch, code_file, found):
    monkeypatch.setattr(transformers, "__version__", found)
    spec = importlib.util.spec_from_file_location(f"version_check_{Path(code_file).stem}", REPO_ROOT / code_file)
    with pytest.raises(ImportError) as refusal:
        spec.loader.exec_module(importlib.util.module_from_spec(spec))
    assert str(refusal.value) == REFUSAL.format(found=found)


@pytest.mark.parametrize("found", [MIN_TRANSFORMERS_VERSION, f"{MAJOR_MINOR}.0.dev0", "5.25.0"])
def test_the_minimum_and_newer_pass_the_check(monkeypatch, found):
    monkeypatch.setattr(transformers, "__version__", found)
    # the configuration file imports nothing of its own package, so it loads standalone
    spec = importlib.util.spec_from_file_location("version_check_configuration", REPO_ROOT / CODE_FILES[0])
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.LlavaTrimConfig.model_type == "llava_trim"


def test_every_place_states_the_same_minimum():
    major, minor = (int(part) for part in MAJOR_MINOR.split("."))
    for code_file in CODE_FILES:
        source = (REPO_ROOT / code_file).read_text()  # the refusal's wording is checked above, by running it
        assert f'transformers.__version__.split(".")[:2]) < ({major}, {minor}):' in source, code_file
    pyproject = (REPO_ROOT / "pyproject.toml").read_text()
    assert re.findall(r'"transformers>=([0-9.]+),<6"', pyproject) == [MAJOR_MINOR]
    assert f"OLDEST_TRANSFORMERS := {MIN_TRANSFORMERS_VERSION}\n" in (REPO_ROOT / "Makefile").read_text()
    readme = (REPO_ROOT / "README.md").read_text()
    supported = readme.split("## Supported versions", 1)[1].split("\n## ", 1)[0]
    assert f"transformers >= {MIN_TRANSFORMERS_VERSION}" in supported
    card = (REPO_ROOT / "conversion" / "model_card.md").read_text()
    assert "Needs transformers >= ${min_transformers}" in card  # filled in with MIN_TRANSFORMERS_VERSION
