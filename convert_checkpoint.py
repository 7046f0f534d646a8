# Copyright 2026 The llava-trim authors. Licensed under the Apache License, Version 2.0.
"""Convert a LLaVA-1.5 checkpoint and CLIP into a LLaVA-TRIM model repository that loads with `trust_remote_code`.

Sources (local folders or Hub ids):

- `--llava`: an original LLaVA-1.5 checkpoint (`liuhaotian/llava-v1.5-7b`: `.bin` shards, no CLIP weights), a TRIM
  checkpoint (`FreedomIntelligence/llava-v1.5-7b-TRIM`: safetensors shards with the CLIP towers embedded) or a
  transformers-native one (`llava-hf/llava-1.5-7b-hf`, legacy or current weight names).
- `--clip`: the full CLIP model (`openai/clip-vit-large-patch14-336`): its text tower and projections score the image
  patches for TRIM, its vision tower is LLaVA's unless the source embeds one, and its tokenizer and image processor
  go into the processor.

The output folder is a complete Hub repository: sharded safetensors with their index, `config.json` (with
`auto_map`), `generation_config.json`, the three `*_llava_trim.py` code files, the processor files (the CLIP
tokenizer in `clip_tokenizer/`), `LICENSE` and a model card. Reading order of this file: sources (folders, weight
files, key names), the conversion plan, the streaming writer, the other repository files, verification, the Hub
upload, then the command line.

```bash
python convert_checkpoint.py --llava liuhaotian/llava-v1.5-7b --output llava-v1.5-7b-trim --verify
```
"""

import argparse
import contextlib
import importlib.metadata
import json
import logging
import math
import os
import re
import shutil
import signal
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

if __package__:
    from .configuration_llava_trim import LlavaTrimConfig, check_trim_ratio
else:  # run as a script (`python convert_checkpoint.py ...`): import this folder as the `llava_trim` package
    import importlib.util

    if "llava_trim" not in sys.modules:
        _root = Path(__file__).resolve().parent
        _spec = importlib.util.spec_from_file_location(
            "llava_trim", _root / "__init__.py", submodule_search_locations=[str(_root)]
        )
        sys.modules["llava_trim"] = importlib.util.module_from_spec(_spec)
        _spec.loader.exec_module(sys.modules["llava_trim"])
    from llava_trim.configuration_llava_trim import LlavaTrimConfig, check_trim_ratio

logger = logging.getLogger("llava_trim.convert_checkpoint")

DEFAULT_CLIP = "openai/clip-vit-large-patch14-336"
IMAGE_TOKEN = "<image>"
PAD_TOKEN = "<pad>"
CODE_FILES = ("configuration_llava_trim.py", "modeling_llava_trim.py", "processing_llava_trim.py")
SUPPORTED_PROJECTORS = ("mlp2x_gelu",)
DEFAULT_MAX_NEW_TOKENS = 512
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# the embedded-CLIP prefixes of TRIM checkpoints (the reference `CLIPVisionTower` holds `vision_tower`, a
# `CLIPVisionModelWithProjection`, and `text_tower`, a `CLIPTextModelWithProjection`)
TRIM_VISION_PREFIX = "model.vision_tower.vision_tower."
TRIM_TEXT_PREFIX = "model.vision_tower.text_tower."


class _FromSource:
    """Default of `--trim-ratio`: the source's `mm_vision_token_reduce_func`, else -1."""

    def __repr__(self) -> str:
        return "FROM_SOURCE"


FROM_SOURCE = _FromSource()


class ConversionError(ValueError):
    """A source the converter cannot turn into a correct repository; the message names the problem and the fix."""


# ---------------------------------------------------------------------------------------------------------------------
# Sources: folders, weight files, tensor names
# ---------------------------------------------------------------------------------------------------------------------


def resolve_source(name: str, flag: str) -> Path:
    """
    A local folder as is, or a Hub repository id downloaded (configs, tokenizer, one weight format) to the cache.

    Raises:
        `ConversionError`: when `name` is a file, a missing local path, or a Hub id that cannot be downloaded.
    """
    path = Path(name).expanduser()
    if path.is_dir():
        return path.resolve()
    if path.exists():
        raise ConversionError(f"{flag} {name} is a file: pass the folder holding config.json and the weights.")
    if name.startswith((".", "/", "~")) or name.count("/") != 1:
        raise ConversionError(f"{flag} {name}: no such folder (and not a Hub id of the form 'owner/name').")

    import huggingface_hub

    patterns = ["*.json", "*.model", "*.txt", "*.jinja", "README.md", "LICENSE*"]
    try:
        files = huggingface_hub.list_repo_files(name)
        has_safetensors = any(f.endswith(".safetensors") for f in files)
        patterns += ["*.safetensors"] if has_safetensors else ["*.bin"]
    except Exception:  # offline, or a network error: the cache may still hold a snapshot
        patterns += ["*.safetensors", "*.bin"]
    try:
        logger.info("Downloading %s (%s) from the Hub...", name, flag)
        return Path(huggingface_hub.snapshot_download(name, allow_patterns=patterns))
    except Exception as error:
        raise ConversionError(
            f"Could not get {flag} {name} from the Hub ({type(error).__name__}: {error}). Check the repository id, "
            "your network and `hf auth login` for gated repositories, or pass a local folder."
        ) from None


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConversionError(f"{path} is missing: the folder is not a complete checkpoint.") from None
    except json.JSONDecodeError as error:
        raise ConversionError(f"{path} is not valid JSON ({error}): download it again.") from None


_SHARD_RE = re.compile(r"-(\d+)-of-(\d+)\.(?:safetensors|bin)$")


def find_weight_files(folder: Path) -> tuple[list[Path], dict[str, str] | None]:
    """
    The weight files of a checkpoint folder, in load order, and the index's `weight_map` when there is one.

    Looks for `model.safetensors.index.json`, `pytorch_model.bin.index.json`, `model.safetensors`,
    `pytorch_model.bin`, then unindexed `model-0000k-of-0000n.safetensors` / `pytorch_model-0000k-of-0000n.bin` shards.

    Raises:
        `ConversionError`: when the folder has no weights, or an index or the shard numbering names a missing file.
    """
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index_path = folder / index_name
        if index_path.is_file():
            weight_map = _read_json(index_path).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise ConversionError(f"{index_path} has no 'weight_map': download the index again.")
            names = sorted(set(weight_map.values()))
            missing = [name for name in names if not (folder / name).is_file()]
            if missing:
                raise ConversionError(
                    f"{index_path} names {len(missing)} weight file(s) that are not in {folder}: "
                    f"{', '.join(missing)}. The download is incomplete: download the missing shard(s) again."
                )
            return [folder / name for name in names], weight_map
    for single in ("model.safetensors", "pytorch_model.bin"):
        if (folder / single).is_file():
            return [folder / single], None
    shards = sorted(folder.glob("model-*-of-*.safetensors")) or sorted(folder.glob("pytorch_model-*-of-*.bin"))
    if shards:
        totals = {int(m.group(2)) for m in map(_SHARD_RE.search, (s.name for s in shards)) if m}
        present = {int(m.group(1)) for m in map(_SHARD_RE.search, (s.name for s in shards)) if m}
        if len(totals) == 1:
            total = totals.pop()
            missing = sorted(set(range(1, total + 1)) - present)
            if missing:
                pattern = re.sub(r"-\d+-of-", "-{:05d}-of-", shards[0].name)
                names = [pattern.format(i) for i in missing]
                raise ConversionError(
                    f"{folder} holds {len(present)} of {total} weight shards; missing: {', '.join(names)}. "
                    "Download the missing shard(s) again."
                )
        return shards, None
    raise ConversionError(
        f"No weights found in {folder}: expected model.safetensors, pytorch_model.bin, or their shards with an index."
    )


_SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


class WeightReader(contextlib.AbstractContextManager):
    """
    Lazy access to the tensors of one `.safetensors` or `.bin` file: names, shapes and dtypes without reading data.

    `.bin` files are read with `torch.load(weights_only=True, mmap=True)`, so a tensor's bytes are read when it is
    used; files from before PyTorch's zip format are loaded whole.
    """

    def __init__(self, path: Path):
        self.path = path
        self._handle = None
        self._tensors: dict[str, torch.Tensor] | None = None
        try:
            if path.suffix == ".safetensors":
                self._handle = safe_open(path, framework="pt")
                self._names = list(self._handle.keys())
            else:
                self._tensors = _torch_load(path)
                self._names = list(self._tensors)
        except ConversionError:
            raise
        except Exception as error:
            raise ConversionError(
                f"Could not read {path} ({path.stat().st_size} bytes): {error}. The file is truncated or corrupt: "
                "download it again."
            ) from None

    def keys(self) -> list[str]:
        return self._names

    def shape(self, name: str) -> tuple[int, ...]:
        if self._handle is not None:
            return tuple(self._handle.get_slice(name).get_shape())
        return tuple(self._tensors[name].shape)

    def dtype(self, name: str) -> torch.dtype:
        if self._handle is not None:
            code = self._handle.get_slice(name).get_dtype()
            if code not in _SAFETENSORS_DTYPES:
                raise ConversionError(f"{self.path}: tensor {name} has dtype {code}, which the converter cannot read.")
            return _SAFETENSORS_DTYPES[code]
        return self._tensors[name].dtype

    def get(self, name: str) -> torch.Tensor:
        try:
            if self._handle is not None:
                return self._handle.get_tensor(name)
            return self._tensors[name]
        except Exception as error:
            raise ConversionError(
                f"Could not read tensor {name} from {self.path}: {error}. The file is truncated or corrupt: "
                "download it again."
            ) from None

    def close(self) -> None:
        self._handle = None
        self._tensors = None

    def __exit__(self, *exc_info) -> None:
        self.close()


def _torch_load(path: Path) -> dict[str, torch.Tensor]:
    """`torch.load` with `weights_only=True` (never arbitrary pickles), memory-mapped when the format allows it."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as error:
        if "mmap" not in str(error):
            raise
        state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConversionError(f"{path} is not a state dict of tensors.")
    return state


# Every rule maps a source name to candidate target names; the first candidate the model has wins. `{vision}` and
# `{text}` stand for both namings a CLIP tower can have inside the model (with or without the inner `vision_model.` /
# `text_model.` level), so the mapping follows the installed transformers.
_VISION = ("model.vision_tower.{}", "model.vision_tower.vision_model.{}")
_TEXT = ("model.trim_scorer.text_model.{}", "model.trim_scorer.text_model.text_model.{}")
_VISUAL_PROJECTION = ("model.trim_scorer.visual_projection.{}",)
_TEXT_PROJECTION = ("model.trim_scorer.text_projection.{}",)
_DROPPED = re.compile(r"(^|\.)(rotary_emb\.inv_freq|position_ids)$|^logit_scale$")

LLAVA_RULES = [  # original LLaVA (`LlavaLlamaForCausalLM`) and TRIM checkpoints
    (r"model\.embed_tokens\.(.+)", ("model.language_model.embed_tokens.{}",)),
    (r"model\.layers\.(.+)", ("model.language_model.layers.{}",)),
    (r"model\.norm\.(.+)", ("model.language_model.norm.{}",)),
    (r"lm_head\.(.+)", ("lm_head.{}",)),
    (r"model\.mm_projector\.0\.(.+)", ("model.multi_modal_projector.linear_1.{}",)),
    (r"model\.mm_projector\.2\.(.+)", ("model.multi_modal_projector.linear_2.{}",)),
    (re.escape(TRIM_VISION_PREFIX) + r"vision_model\.(.+)", _VISION),
    (re.escape(TRIM_VISION_PREFIX) + r"visual_projection\.(.+)", _VISUAL_PROJECTION),
    (re.escape(TRIM_TEXT_PREFIX) + r"text_model\.(.+)", _TEXT),
    (re.escape(TRIM_TEXT_PREFIX) + r"text_projection\.(.+)", _TEXT_PROJECTION),
]
LLAVA_HF_RULES = [  # transformers-native Llava, legacy (Hub) and current names
    (r"(?:language_model\.model|model\.language_model)\.(.+)", ("model.language_model.{}",)),
    (r"(?:language_model\.lm_head|lm_head)\.(.+)", ("lm_head.{}",)),
    (r"(?:model\.)?vision_tower\.(?:vision_model\.)?(.+)", _VISION),
    (r"(?:model\.)?multi_modal_projector\.(.+)", ("model.multi_modal_projector.{}",)),
]
CLIP_RULES = [  # CLIPModel
    (r"vision_model\.(.+)", _VISION),
    (r"text_model\.(.+)", _TEXT),
    (r"visual_projection\.(.+)", _VISUAL_PROJECTION),
    (r"text_projection\.(.+)", _TEXT_PROJECTION),
]
EMBED_KEY = "model.language_model.embed_tokens.weight"
LM_HEAD_KEY = "lm_head.weight"


def map_key(name: str, rules: list, targets: set[str] | None = None) -> str | None:
    """
    The model's name for source tensor `name`; `None` for tensors to drop (rotary `inv_freq`, `position_ids`,
    `logit_scale`); `""` for a name no rule knows. With `targets`, the first candidate in it wins.
    """
    if _DROPPED.search(name):
        return None
    for pattern, candidates in rules:
        match = re.fullmatch(pattern, name)
        if match:
            names = [candidate.format(match.group(1)) for candidate in candidates]
            if targets is None:
                return names[0]
            return next((n for n in names if n in targets), names[0])
    return ""


# ---------------------------------------------------------------------------------------------------------------------
# Reading the source configs
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class LlavaSource:
    """A LLaVA checkpoint folder: its layout (`"llava"`: original or TRIM; `"llava_hf"`), config and weights."""

    folder: Path
    layout: str
    config: dict
    files: list[Path]
    weight_map: dict[str, str] | None
    rules: list = field(repr=False, default_factory=list)


def read_llava_source(folder: Path) -> LlavaSource:
    """
    Read and check a LLaVA checkpoint's `config.json` (as raw JSON: the original format is not the transformers one).

    Raises:
        `ConversionError`: for what this model cannot represent: a non-Llama LLM, a projector other than
        `mlp2x_gelu`, `anyres`, `mm_use_im_start_end` / `mm_use_im_patch_token`, CLS features, or an unknown layout.
    """
    config = _read_json(folder / "config.json")
    model_type = config.get("model_type", "")
    architectures = config.get("architectures") or []
    files, weight_map = find_weight_files(folder)

    if "text_config" in config or "LlavaForConditionalGeneration" in architectures:
        text_type = (config.get("text_config") or {}).get("model_type", "llama")
        if text_type != "llama":
            raise ConversionError(
                f"{folder} has a {text_type!r} language model; only Llama-based LLaVA-1.5 is supported "
                "(non-Llama LLMs are not supported yet)."
            )
        vision_type = (config.get("vision_config") or {}).get("model_type", "clip_vision_model")
        if vision_type != "clip_vision_model":
            raise ConversionError(f"{folder} has a {vision_type!r} vision tower; TRIM needs a CLIP vision tower.")
        strategy = config.get("vision_feature_select_strategy", "default")
        if strategy != "default":
            raise ConversionError(
                f"{folder} uses vision_feature_select_strategy={strategy!r}; only 'default' (patch tokens, no CLS, as "
                "LLaVA-1.5) is supported."
            )
        return LlavaSource(folder, "llava_hf", config, files, weight_map, LLAVA_HF_RULES)

    is_llama = model_type in ("llava", "llava_llama") and all(a == "LlavaLlamaForCausalLM" for a in architectures)
    if not is_llama:
        if model_type.startswith("llava") or any(a.startswith("Llava") for a in architectures):
            raise ConversionError(
                f"{folder} is a LLaVA checkpoint with a non-Llama language model (model_type={model_type!r}, "
                f"architectures={architectures}); only Llama-based LLaVA-1.5 (LlavaLlamaForCausalLM) is supported."
            )
        raise ConversionError(
            f"{folder}/config.json (model_type={model_type!r}, architectures={architectures}) is not a LLaVA-1.5 "
            "checkpoint: pass an original LLaVA (liuhaotian/llava-v1.5-7b), TRIM "
            "(FreedomIntelligence/llava-v1.5-7b-TRIM) or llava-hf (llava-hf/llava-1.5-7b-hf) checkpoint."
        )
    projector = config.get("mm_projector_type", "linear")  # LLaVA's own default when the key is absent
    if projector not in SUPPORTED_PROJECTORS:
        raise ConversionError(
            f"{folder} uses mm_projector_type={projector!r}; only {', '.join(SUPPORTED_PROJECTORS)} (LLaVA-1.5's "
            "two-layer MLP) is supported."
        )
    aspect = str(config.get("image_aspect_ratio", "pad"))
    merge = str(config.get("mm_patch_merge_type", "flat"))
    if "anyres" in aspect or merge != "flat":
        raise ConversionError(
            f"{folder} uses image_aspect_ratio={aspect!r} / mm_patch_merge_type={merge!r} (LLaVA-NeXT 'anyres' "
            "tiling); only LLaVA-1.5's single 336 px image ('pad' or 'square') is supported."
        )
    for flag in ("mm_use_im_start_end", "mm_use_im_patch_token"):
        if config.get(flag):
            raise ConversionError(
                f"{folder} sets {flag}: true (extra image marker tokens around the image); only LLaVA-1.5's layout "
                f"without them ({flag}: false) is supported."
            )
    feature = config.get("mm_vision_select_feature", "patch")
    if feature != "patch":
        raise ConversionError(
            f"{folder} uses mm_vision_select_feature={feature!r}; only 'patch' (no CLS token, LLaVA-1.5) is supported."
        )
    return LlavaSource(folder, "llava", config, files, weight_map, LLAVA_RULES)


def require_files(
    folder: Path,
    flag: str,
    what: str,
    choices: list[tuple[str, ...]],
    fix: str = "The folder is incomplete: download it again with all its files.",
) -> None:
    """
    Refuse `folder` unless it holds every file of at least one of `choices`, naming the files that are missing.

    Raises:
        `ConversionError`: naming the missing files of the first choice (and the alternatives).
    """
    if any(all((folder / name).is_file() for name in choice) for choice in choices):
        return
    missing = [name for name in choices[0] if not (folder / name).is_file()]
    others = " or ".join(", ".join(choice) for choice in choices[1:])
    alternative = f" (or {others})" if others else ""
    raise ConversionError(f"{flag} {folder} lacks the {what}: {', '.join(missing)} missing{alternative}. {fix}")


CLIP_TOKENIZER_FILES = [("vocab.json", "merges.txt"), ("tokenizer.json",)]
LLAMA_TOKENIZER_FILES = [("tokenizer.model",), ("tokenizer.json",)]
# A question the CLIP tokenizer must give back (CLIP lowercases and splits off punctuation: compared without spaces)
ROUND_TRIP_QUESTION = "What is the colour of the bus?"
MIN_CLIP_VOCAB = 256  # a byte-level BPE has at least the 256 byte symbols


def check_clip_tokenizer(tokenizer, where: str) -> None:
    """
    Refuse a CLIP tokenizer that does not give a question back: encode then decode must return the question (up to
    case and spaces) from a vocabulary of at least the 256 byte symbols.

    Raises:
        `ConversionError`: naming `where` and what came back.
    """
    ids = tokenizer(ROUND_TRIP_QUESTION)["input_ids"]
    decoded = tokenizer.decode(ids, skip_special_tokens=True)

    def squash(text: str) -> str:
        return "".join(text.lower().split())

    if len(tokenizer) < MIN_CLIP_VOCAB or squash(decoded) != squash(ROUND_TRIP_QUESTION):
        raise ConversionError(
            f"The CLIP tokenizer of {where} does not round-trip a question: {ROUND_TRIP_QUESTION!r} came back as "
            f"{decoded!r} from a {len(tokenizer)}-token vocabulary, so TRIM would score patches against nothing. "
            "Pass a CLIP folder with its complete tokenizer (vocab.json and merges.txt, or tokenizer.json)."
        )


def read_clip_preprocessing(folder: Path):
    """
    The CLIP tokenizer and image processor of `folder`, after checking their files and that the tokenizer
    round-trips a question.

    Raises:
        `ConversionError`: naming the missing files, or when the tokenizer does not round-trip a question.
    """
    from transformers import AutoImageProcessor, AutoTokenizer

    require_files(folder, "--clip", "CLIP tokenizer", CLIP_TOKENIZER_FILES)
    require_files(folder, "--clip", "CLIP image processor settings", [("preprocessor_config.json",)])
    try:
        clip_tokenizer = AutoTokenizer.from_pretrained(folder)
        image_processor = AutoImageProcessor.from_pretrained(folder)
    except Exception as error:
        raise ConversionError(
            f"Could not load the CLIP tokenizer and image processor of {folder} ({error}): the CLIP folder needs "
            "vocab.json, merges.txt (or tokenizer.json) and preprocessor_config.json."
        ) from None
    check_clip_tokenizer(clip_tokenizer, f"--clip {folder}")
    return clip_tokenizer, image_processor


def read_clip(folder: Path):
    """The `CLIPConfig` of a full CLIP checkpoint (vision and text towers), with its weight files."""
    from transformers import AutoConfig, CLIPConfig

    try:
        config = AutoConfig.from_pretrained(folder)
    except Exception as error:
        raise ConversionError(f"Could not read the CLIP config in {folder}: {error}") from None
    if not isinstance(config, CLIPConfig):
        raise ConversionError(
            f"{folder} holds a {type(config).__name__}, not a full CLIP model: TRIM needs CLIP's text tower and both "
            f"projections (a CLIPModel checkpoint such as {DEFAULT_CLIP})."
        )
    return config


def parse_trim_ratio(value: str) -> float | None:
    """`--trim-ratio`: `none`/`off` (plain LLaVA), `-1`/`auto`, or a fraction in (0, 1]."""
    text = value.strip().lower()
    if text in ("none", "off"):
        return None
    if text == "auto":
        return -1
    try:
        ratio = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected none, auto, -1 or a fraction in (0, 1], got {value!r}") from None
    ratio = -1 if ratio == -1 else ratio
    try:
        check_trim_ratio(ratio)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return ratio


def trim_ratio_from_source(config: dict) -> float | None | str:
    """The `trim_ratio` a source's `mm_vision_token_reduce_func` ("TRIM:x") asks for; `"absent"` when it has none."""
    func = config.get("mm_vision_token_reduce_func")
    if not func:
        return "absent"
    match = re.fullmatch(r"\s*(TRIM\+?|TextSim\+?)\s*:\s*(\S+)\s*", str(func))
    if not match:
        raise ConversionError(
            f"mm_vision_token_reduce_func={func!r} is not a TRIM setting ('TRIM:<ratio>'): pass --trim-ratio to "
            "choose the reduction explicitly."
        )
    try:
        ratio = float(match.group(2))
        ratio = -1 if ratio == -1 else ratio
        check_trim_ratio(ratio)
    except ValueError:
        raise ConversionError(
            f"mm_vision_token_reduce_func={func!r} has no valid ratio (-1 or a fraction in (0, 1]): pass --trim-ratio."
        ) from None
    return ratio


def parse_size(value: str) -> int:
    """`--max-shard-size`: bytes, or a number with KB/MB/GB (powers of 1000) or KiB/MiB/GiB (powers of 1024)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", value, flags=re.IGNORECASE)
    if not match:
        raise argparse.ArgumentTypeError(f"expected a size such as 5GB, 500MB or 1073741824, got {value!r}")
    unit = (match.group(2) or "B").upper()
    powers = {"B": 1, "KB": 1e3, "MB": 1e6, "GB": 1e9, "TB": 1e12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    powers["TIB"] = 2**40
    size = int(float(match.group(1)) * powers[unit])
    if size <= 0:
        raise argparse.ArgumentTypeError("the shard size must be positive")
    return size


# ---------------------------------------------------------------------------------------------------------------------
# The conversion plan
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class PlannedTensor:
    """One output tensor: where it comes from and its final shape (embedding rows grow for the added tokens)."""

    target: str
    file: Path
    source_name: str
    source_shape: tuple[int, ...]
    source_dtype: torch.dtype
    shape: tuple[int, ...]
    dtype: torch.dtype  # output dtype: the conversion's, or float32 for the modules the model keeps in float32
    compare_with: tuple[Path, str] | None = None  # the `--clip` tensor an embedded CLIP tensor is checked against

    @property
    def grows_rows(self) -> bool:
        return self.shape != self.source_shape


@dataclass
class ConversionPlan:
    """Everything decided before any weight is written."""

    config: LlavaTrimConfig
    tensors: list[PlannedTensor]
    dtype: torch.dtype
    source_dtype: torch.dtype
    tokenizer: object
    clip_tokenizer: object
    image_processor: object
    added_token_ids: list[int]
    suppressed_token_ids: list[int]
    llava: LlavaSource
    clip_folder: Path

    @property
    def total_bytes(self) -> int:
        return sum(math.prod(t.shape) * t.dtype.itemsize for t in self.tensors)


def _scan(files: list[Path], weight_map: dict[str, str] | None) -> list[tuple[Path, str, tuple, torch.dtype]]:
    """Names, shapes and dtypes of every tensor in `files` (no data read); checks them against the index."""
    entries = []
    for path in files:
        with WeightReader(path) as reader:
            names = reader.keys()
            if weight_map is not None:
                expected = {name for name, file in weight_map.items() if file == path.name}
                missing = sorted(expected - set(names))
                if missing:
                    raise ConversionError(
                        f"{path} lacks {len(missing)} tensor(s) its index assigns to it (e.g. {missing[0]}): the "
                        "shard is truncated or from another download. Download it again."
                    )
            entries += [(path, name, reader.shape(name), reader.dtype(name)) for name in names]
    return entries


def _llama_text_config(source: LlavaSource, vocab_size: int, pad_token_id: int) -> dict:
    """The Llama `text_config` of the output, from the source's config."""
    raw = source.config
    if source.layout == "llava_hf":
        text = dict(raw["text_config"])
    else:
        fields = (
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "head_dim",
            "hidden_act",
            "max_position_embeddings",
            "rms_norm_eps",
            "rope_theta",
            "rope_scaling",
            "attention_bias",
            "mlp_bias",
            "bos_token_id",
            "eos_token_id",
            "initializer_range",
        )
        text = {key: raw[key] for key in fields if raw.get(key) is not None}
    for key in ("architectures", "torch_dtype", "dtype", "_name_or_path", "transformers_version"):
        text.pop(key, None)
    text.update(model_type="llama", vocab_size=vocab_size, pad_token_id=pad_token_id, tie_word_embeddings=False)
    return text


def _load_tokenizer(source: LlavaSource):
    """The source's Llama tokenizer with `<image>` and `<pad>` added (special tokens), padding on the left."""
    from transformers import AddedToken, AutoTokenizer

    from llava_trim.processing_llava_trim import add_image_token

    require_files(source.folder, "--llava", "Llama tokenizer", LLAMA_TOKENIZER_FILES)
    try:
        with _quiet_transformers():  # it also reads config.json, which is not a transformers config in most sources
            tokenizer = AutoTokenizer.from_pretrained(source.folder)
    except Exception as error:
        raise ConversionError(
            f"Could not load the tokenizer of {source.folder} ({error}): the folder needs tokenizer.model or "
            "tokenizer.json with tokenizer_config.json."
        ) from None
    vocab = tokenizer.get_vocab()
    add_image_token(tokenizer, IMAGE_TOKEN)
    if PAD_TOKEN not in vocab:
        tokenizer.add_special_tokens({"pad_token": AddedToken(PAD_TOKEN, special=True, normalized=False)})
    tokenizer.pad_token = PAD_TOKEN
    tokenizer.padding_side = "left"
    return tokenizer


@contextlib.contextmanager
def _quiet_transformers():
    """Silence transformers' warnings about reading a non-transformers `config.json` (the original LLaVA format)."""
    import warnings

    from transformers.utils import logging as transformers_logging

    verbosity = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            yield
    finally:
        transformers_logging.set_verbosity(verbosity)


def _meta_model_weights(config: LlavaTrimConfig) -> tuple[dict[str, tuple[int, ...]], list[str]]:
    """
    Names and shapes of the model's weights, from a model built on the meta device (no memory), and the names of the
    modules it keeps in float32 whatever its dtype (`_keep_in_fp32_modules`: TRIM's projections).
    """
    from llava_trim.modeling_llava_trim import LlavaTrimForConditionalGeneration

    with torch.device("meta"):
        model = LlavaTrimForConditionalGeneration(config)
    shapes = {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}
    return shapes, list(getattr(model, "_keep_in_fp32_modules", None) or [])


def _output_dtype(target: str, dtype: torch.dtype, keep_in_fp32: list[str]) -> torch.dtype:
    """`dtype`, except float32 for weights of modules the model keeps in float32 (never a narrowing cast)."""
    if dtype.itemsize < 4 and any(module in target.split(".") for module in keep_in_fp32):
        return torch.float32
    return dtype


def plan_conversion(
    llava: LlavaSource,
    clip_folder: Path,
    trim_ratio: float | None | _FromSource = FROM_SOURCE,
    dtype: torch.dtype | None = None,
) -> ConversionPlan:
    """
    Read configs, tokenizer and tensor metadata of both sources, build the output config and map every tensor.

    Nothing is loaded but shapes. Tensors of the LLaVA source win; `--clip` fills in what it lacks (for an original
    LLaVA: the vision tower and all of TRIM's parts; for llava-hf: TRIM's parts). CLIP tensors the source embeds too
    are compared while writing.

    Raises:
        `ConversionError`: unknown tensor names (listed), missing tensors, shapes that do not fit CLIP or the config.
    """
    clip_config = read_clip(clip_folder)
    clip_tokenizer, image_processor = read_clip_preprocessing(clip_folder)
    clip_files, clip_map = find_weight_files(clip_folder)
    llava_entries = _scan(llava.files, llava.weight_map)
    clip_entries = _scan(clip_files, clip_map)

    # ---- configuration ----
    vision = clip_config.vision_config
    raw = llava.config
    if llava.layout == "llava":
        mm_hidden = raw.get("mm_hidden_size")
        if mm_hidden is not None and mm_hidden != vision.hidden_size:
            raise ConversionError(
                f"Shape mismatch with CLIP: {llava.folder} has mm_hidden_size={mm_hidden} (its projector reads "
                f"{mm_hidden}-dim features) but the CLIP vision tower of {clip_folder} has hidden_size="
                f"{vision.hidden_size}. Pass the CLIP the model was trained with (--clip, config's mm_vision_tower: "
                f"{raw.get('mm_vision_tower')!r})."
            )
        logger.info("Vision tower named by the source: %s; CLIP used: %s", raw.get("mm_vision_tower"), clip_folder)
        vision_config = vision.to_dict()
        feature_layer = raw.get("mm_vision_select_layer", -2)
    else:
        vision_config = dict(raw["vision_config"])
        mismatched = [
            f"{key}: {vision_config.get(key)} vs {getattr(vision, key)}"
            for key in ("hidden_size", "image_size", "patch_size", "num_hidden_layers")
            if vision_config.get(key, getattr(vision, key)) != getattr(vision, key)
        ]
        if mismatched:
            raise ConversionError(
                f"Shape mismatch with CLIP: the vision tower of {llava.folder} differs from {clip_folder} "
                f"({'; '.join(mismatched)}). Pass the CLIP the model was built on (--clip)."
            )
        feature_layer = raw.get("vision_feature_layer", -2)
    if (
        not isinstance(feature_layer, int)
        or not -vision.num_hidden_layers <= feature_layer <= vision.num_hidden_layers
    ):
        raise ConversionError(
            f"The vision feature layer {feature_layer!r} does not exist in a {vision.num_hidden_layers}-layer CLIP."
        )

    if trim_ratio is FROM_SOURCE:
        from_source = trim_ratio_from_source(raw)
        trim_ratio = -1 if from_source == "absent" else from_source

    tokenizer = _load_tokenizer(llava)
    image_token_id, pad_token_id = tokenizer.convert_tokens_to_ids([IMAGE_TOKEN, PAD_TOKEN])
    embed_entries = [e for e in llava_entries if map_key(e[1], llava.rules) == EMBED_KEY]
    if not embed_entries:
        raise ConversionError(f"{llava.folder} has no token embedding matrix ({EMBED_KEY} or its source names).")
    source_vocab = embed_entries[0][2][0]
    vocab_size = max(source_vocab, len(tokenizer))
    added = [i for i in range(source_vocab, len(tokenizer))]
    # every id that is not a text token of the source: the added tokens and any padding rows
    suppressed = sorted({image_token_id, pad_token_id, *range(len(tokenizer), vocab_size)} | set(added))

    floating = Counter()
    for _, name, shape, tensor_dtype in llava_entries:
        if tensor_dtype.is_floating_point and map_key(name, llava.rules):
            floating[tensor_dtype] += math.prod(shape)
    source_dtype = floating.most_common(1)[0][0] if floating else torch.float32
    dtype = dtype or source_dtype

    image_seq_length = (vision.image_size // vision.patch_size) ** 2
    config = LlavaTrimConfig(
        vision_config=vision_config,
        text_config=_llama_text_config(llava, vocab_size, pad_token_id),
        clip_text_config=clip_config.text_config.to_dict(),
        projection_dim=clip_config.projection_dim,
        image_token_index=image_token_id,
        image_seq_length=image_seq_length,
        vision_feature_layer=feature_layer,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
        multimodal_projector_bias=True,
        tie_word_embeddings=False,
        trim_ratio=trim_ratio,
    )
    config.dtype = dtype
    config.architectures = ["LlavaTrimForConditionalGeneration"]
    expected, keep_in_fp32 = _meta_model_weights(config)
    targets = set(expected)

    # ---- tensors ----
    tensors: dict[str, PlannedTensor] = {}
    unknown = []
    for path, name, shape, tensor_dtype in llava_entries:
        target = map_key(name, llava.rules, targets)
        if target is None:
            continue
        if target == "" or target not in targets:
            unknown.append(name)
            continue
        if target in tensors:
            raise ConversionError(
                f"{llava.folder} has two tensors for {target}: {tensors[target].source_name}, {name}."
            )
        tensors[target] = PlannedTensor(
            target, path, name, shape, tensor_dtype, expected[target], _output_dtype(target, dtype, keep_in_fp32)
        )
    if unknown:
        raise ConversionError(
            f"{llava.folder} has {len(unknown)} tensor(s) with unknown names: {_listing(unknown)}. This is not a "
            "LLaVA-1.5 checkpoint in a supported layout (original, TRIM or llava-hf); nothing was converted."
        )
    from_clip = 0
    clip_unknown = []
    for path, name, shape, tensor_dtype in clip_entries:
        target = map_key(name, CLIP_RULES, targets)
        if target is None:
            continue
        if target == "" or target not in targets:
            clip_unknown.append(name)
            continue
        if target in tensors:
            tensors[target].compare_with = (path, name)
            continue
        tensors[target] = PlannedTensor(
            target, path, name, shape, tensor_dtype, expected[target], _output_dtype(target, dtype, keep_in_fp32)
        )
        from_clip += 1
    if clip_unknown:
        raise ConversionError(
            f"The CLIP checkpoint {clip_folder} has {len(clip_unknown)} tensor(s) with unknown names: "
            f"{_listing(clip_unknown)}. Pass a transformers CLIPModel checkpoint (--clip)."
        )
    missing = sorted(targets - set(tensors))
    if missing:
        raise ConversionError(
            f"The sources lack {len(missing)} tensor(s) the model needs: {_listing(missing)}. Check that --llava is "
            "complete and that --clip is a full CLIP model (vision and text towers)."
        )

    mismatched = []
    for planned in tensors.values():
        grows = planned.target in (EMBED_KEY, LM_HEAD_KEY)
        fits = planned.source_shape == planned.shape or (
            grows and planned.source_shape[1:] == planned.shape[1:] and planned.source_shape[0] <= planned.shape[0]
        )
        if not fits:
            mismatched.append(
                f"{planned.source_name} {list(planned.source_shape)} -> {planned.target} {list(planned.shape)}"
            )
    if mismatched:
        raise ConversionError(
            f"Shape mismatch with CLIP or the config: {len(mismatched)} tensor(s) do not fit the model built from "
            f"{llava.folder}/config.json and {clip_folder}: {_listing(mismatched, 5)}. Pass the CLIP the model was "
            "trained with (--clip) and check mm_hidden_size."
        )

    # write in source order (LLaVA files, then CLIP files) so shards stream one source file at a time
    order = {path: i for i, path in enumerate([*llava.files, *clip_files])}
    ordered = sorted(tensors.values(), key=lambda t: order[t.file])
    logger.info(
        "Plan: %d tensors (%d from %s, %d from %s), %s -> %s, vocabulary %d -> %d (%s = %d, %s = %d), trim_ratio=%s",
        len(ordered),
        len(ordered) - from_clip,
        llava.folder,
        from_clip,
        clip_folder,
        str(source_dtype).removeprefix("torch."),
        str(dtype).removeprefix("torch."),
        source_vocab,
        vocab_size,
        IMAGE_TOKEN,
        image_token_id,
        PAD_TOKEN,
        pad_token_id,
        trim_ratio,
    )
    return ConversionPlan(
        config,
        ordered,
        dtype,
        source_dtype,
        tokenizer,
        clip_tokenizer,
        image_processor,
        added,
        suppressed,
        llava,
        clip_folder,
    )


def _listing(names: list[str], limit: int = 20) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


# ---------------------------------------------------------------------------------------------------------------------
# Streaming writer
# ---------------------------------------------------------------------------------------------------------------------


def output_tensor(planned: PlannedTensor, source: torch.Tensor) -> torch.Tensor:
    """
    The output value of one tensor: the source cast to the planned dtype (a no-op when equal), and for the token
    embeddings and the LM head the new rows of the added tokens.

    New rows are the mean of the existing rows (computed in float32). For the LM head this makes the new tokens'
    logit the mean of all logits, so it never exceeds the largest one: greedy decoding cannot pick them (an equal
    logit loses to the lower id), whatever the hidden state. Sampling could, which is why `generation_config.json`
    also suppresses them (`suppress_tokens`). A zero row would not do: its logit 0 beats every token whenever all
    logits are negative.
    """
    dtype = planned.dtype
    tensor = source.to(dtype)
    if not planned.grows_rows:
        return tensor.contiguous()
    rows = planned.shape[0] - planned.source_shape[0]
    mean = source.float().mean(dim=0, keepdim=True).to(dtype)  # (1, hidden)
    return torch.cat([tensor, mean.expand(rows, -1)], dim=0).contiguous()  # (new_vocab, hidden)


def write_weights(plan: ConversionPlan, folder: Path, max_shard_size: int) -> dict[str, list[str]]:
    """
    Write the planned tensors as safetensors shards (`huggingface_hub`'s sharding: tensors in plan order, a new shard
    when the next tensor would pass `max_shard_size`) plus `model.safetensors.index.json` when there are several.

    Source files are opened one at a time and a shard is written as soon as its last tensor is ready, so memory holds
    about one source file (memory-mapped or lazily read) and one output shard.

    Returns:
        `dict[str, list[str]]`: the embedded CLIP tensors that differ from `--clip` (by name), empty when none.
    """
    from huggingface_hub import split_torch_state_dict_into_shards

    meta = {t.target: torch.empty(t.shape, dtype=t.dtype, device="meta") for t in plan.tensors}
    split = split_torch_state_dict_into_shards(
        meta, filename_pattern="model{suffix}.safetensors", max_shard_size=max_shard_size
    )
    shard_of = split.tensor_to_filename
    remaining = {name: set(tensors) for name, tensors in split.filename_to_tensors.items()}
    buffers: dict[str, dict[str, torch.Tensor]] = {name: {} for name in remaining}
    differing: list[str] = []
    clip_readers: dict[Path, WeightReader] = {}

    progress = tqdm(total=plan.total_bytes, unit="B", unit_scale=True, unit_divisor=1024, desc="Writing shards")
    try:
        position = 0
        while position < len(plan.tensors):
            path = plan.tensors[position].file
            group = []
            while position < len(plan.tensors) and plan.tensors[position].file == path:
                group.append(plan.tensors[position])
                position += 1
            with WeightReader(path) as reader:
                for planned in group:
                    source = reader.get(planned.source_name)
                    if planned.compare_with is not None:
                        clip_path, clip_name = planned.compare_with
                        if clip_path not in clip_readers:
                            clip_readers[clip_path] = WeightReader(clip_path)
                        reference = clip_readers[clip_path].get(clip_name)
                        if reference.shape != source.shape or not torch.equal(reference.to(source.dtype), source):
                            differing.append(planned.source_name)
                    shard = shard_of[planned.target]
                    buffers[shard][planned.target] = output_tensor(planned, source)
                    del source
                    remaining[shard].discard(planned.target)
                    progress.update(math.prod(planned.shape) * planned.dtype.itemsize)
                    if not remaining[shard]:
                        save_file(buffers.pop(shard), folder / shard, metadata={"format": "pt"})
    finally:
        progress.close()
        for reader in clip_readers.values():
            reader.close()
    if split.is_sharded:
        index = {
            "metadata": {"total_size": split.metadata["total_size"]},
            "weight_map": dict(sorted(shard_of.items())),
        }
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    if differing:
        logger.warning(
            "The checkpoint embeds %d CLIP tensor(s) that differ from --clip %s; the embedded ones are used: %s",
            len(differing),
            plan.clip_folder,
            _listing(differing),
        )
    return {"differing_clip_tensors": differing}


# ---------------------------------------------------------------------------------------------------------------------
# The other repository files
# ---------------------------------------------------------------------------------------------------------------------


def _package_file(name: str) -> Path:
    """A file shipped beside this module (the code files; LICENSE in a source checkout or an installed wheel)."""
    path = Path(__file__).resolve().parent / name
    if path.is_file():
        return path
    if name == "LICENSE":
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            for file in importlib.metadata.distribution("llava-trim").files or []:
                if file.name == "LICENSE":
                    return Path(file.locate())
    raise ConversionError(f"{name} is missing from the llava-trim installation ({path}): reinstall llava-trim.")


def write_generation_config(plan: ConversionPlan, folder: Path) -> None:
    """
    The source's generation config, greedy (as LLaVA's evaluation), with the added tokens suppressed and the source's
    `max_length` (the context length) replaced by `max_new_tokens` (512 unless the source sets it).
    """
    from transformers import GenerationConfig

    source = plan.llava.folder / "generation_config.json"
    if source.is_file():
        generation_config = GenerationConfig.from_pretrained(plan.llava.folder)
    else:
        generation_config = GenerationConfig.from_model_config(plan.config.text_config)
    text_config = plan.config.text_config
    for special in ("bos_token_id", "eos_token_id"):
        if getattr(generation_config, special) is None:
            setattr(generation_config, special, getattr(text_config, special))
    generation_config.pad_token_id = text_config.pad_token_id
    generation_config.do_sample = False
    # the source's `max_length` is the context length (4096 for LLaVA-1.5); stored, it makes every call that passes
    # `max_new_tokens` warn. A cap on new tokens says the same without the warning (LLaVA's CLI default: 512).
    if generation_config.max_new_tokens is None:
        generation_config.max_new_tokens = DEFAULT_MAX_NEW_TOKENS
    generation_config.max_length = GenerationConfig().max_length
    for sampling_field in ("temperature", "top_p", "top_k"):
        setattr(generation_config, sampling_field, None)
    generation_config.suppress_tokens = plan.suppressed_token_ids
    generation_config.save_pretrained(folder)


def write_processor(plan: ConversionPlan, folder: Path) -> None:
    """The `LlavaTrimProcessor`: Llama tokenizer (with `<image>`, `<pad>`), CLIP tokenizer, CLIP image processor."""
    from llava_trim.processing_llava_trim import LlavaTrimProcessor

    processor = LlavaTrimProcessor(
        image_processor=plan.image_processor,
        tokenizer=plan.tokenizer,
        clip_tokenizer=plan.clip_tokenizer,
        image_token=IMAGE_TOKEN,
        image_seq_length=plan.config.image_seq_length,
    )
    LlavaTrimProcessor.register_for_auto_class("AutoProcessor")
    processor.save_pretrained(folder)


def write_config(plan: ConversionPlan, folder: Path) -> None:
    """`config.json` with `auto_map`, and the three code files the map points to."""
    plan.config.auto_map = {
        "AutoConfig": "configuration_llava_trim.LlavaTrimConfig",
        "AutoModel": "modeling_llava_trim.LlavaTrimModel",
        "AutoModelForImageTextToText": "modeling_llava_trim.LlavaTrimForConditionalGeneration",
    }
    plan.config.save_pretrained(folder)
    for name in CODE_FILES:
        shutil.copyfile(_package_file(name), folder / name)


def _card_metadata(source_folder: Path) -> dict:
    from huggingface_hub.repocard import metadata_load

    readme = source_folder / "README.md"
    with contextlib.suppress(Exception):
        return metadata_load(readme) or {} if readme.is_file() else {}
    return {}


def write_model_card(
    plan: ConversionPlan,
    folder: Path,
    model_id: str,
    llava_name: str,
    clip_name: str,
    license_name: str | None,
    base_models: list[str],
    command: str,
) -> None:
    """The model card: YAML metadata (library, pipeline, license, base models, tags) and usage that runs as written."""
    from huggingface_hub import ModelCard, ModelCardData

    source_card = _card_metadata(plan.llava.folder)
    license_name = license_name or source_card.get("license") or "llama2"
    data = ModelCardData(
        library_name="transformers",
        pipeline_tag="image-text-to-text",
        license=license_name,
        base_model=(base_models[0] if len(base_models) == 1 else base_models) or None,
        tags=["llava", "llava-1.5", "trim", "token-reduction", "clip", "vision-language", "custom_code"],
    )
    config = plan.config
    trim = {None: "off (plain LLaVA-1.5)", -1: "-1 (automatic: interquartile-range outliers)"}.get(
        config.trim_ratio, f"{config.trim_ratio} (fixed fraction of the {config.image_seq_length} image tokens)"
    )
    dtype_name = str(plan.dtype).removeprefix("torch.")
    layout = "transformers Llava layout" if plan.llava.layout == "llava_hf" else "original LLaVA repository layout"
    kept_fp32 = sorted({t.target.rsplit(".", 1)[0] for t in plan.tensors if t.dtype != plan.dtype})
    fp32_note = f"; `{'`, `'.join(kept_fp32)}` stay float32, as the model keeps them" if kept_fp32 else ""
    content = f"""---
{data.to_yaml()}
---

# {Path(model_id).name}

LLaVA-1.5 with **TRIM** (Token Reduction using CLIP Metric, [arXiv 2409.10994](https://arxiv.org/abs/2409.10994)) as a
transformers model repository: `AutoModelForImageTextToText`, `AutoProcessor` and `pipeline("image-text-to-text")` with
`trust_remote_code=True`.

TRIM scores each of the {config.image_seq_length} image patch tokens by CLIP similarity to the question, keeps the
outliers and merges the rest into one averaged token, so the language model reads a fraction of the image tokens.
Converted from `{llava_name}` (LLaVA weights) and `{clip_name}` (CLIP text tower and projections for the scores) with
llava-trim's `convert_checkpoint.py`.

## Usage

```python
import torch
from transformers import pipeline

pipe = pipeline(
    "image-text-to-text", model="{model_id}", trust_remote_code=True, dtype=torch.{dtype_name}, device_map="auto"
)
messages = [{{"role": "user", "content": [
    {{"type": "image", "url": "http://images.cocodataset.org/val2017/000000039769.jpg"}},
    {{"type": "text", "text": "What animals are in the picture?"}},
]}}]
print(pipe(text=messages, max_new_tokens=32, return_full_text=False)[0]["generated_text"])
print(pipe(text=messages, max_new_tokens=32, return_full_text=False, generate_kwargs={{"trim_ratio": 0.25}}))
```

With the model and processor directly, per-call control of TRIM and the tokens it kept:

```python
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

model = AutoModelForImageTextToText.from_pretrained(
    "{model_id}", trust_remote_code=True, dtype=torch.{dtype_name}, device_map="auto"
)
processor = AutoProcessor.from_pretrained("{model_id}", trust_remote_code=True)
messages = [{{"role": "user", "content": [
    {{"type": "image", "url": "http://images.cocodataset.org/val2017/000000039769.jpg"}},
    {{"type": "text", "text": "What animals are in the picture?"}},
]}}]
inputs = processor.apply_chat_template(
    messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
).to(model.device)
out = model.generate(**inputs, max_new_tokens=32)                    # TRIM as configured
baseline = model.generate(**inputs, max_new_tokens=32, trim_ratio=None)  # plain LLaVA-1.5
print(processor.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))
print("image tokens kept:", model.select_image_tokens(**inputs).num_kept.tolist(), "of", {config.image_seq_length})
```

## Conversion

| | |
| --- | --- |
| LLaVA source | `{llava_name}` ({layout}, {str(plan.source_dtype).removeprefix("torch.")}) |
| CLIP | `{clip_name}` |
| weights | {len(plan.tensors)} tensors, {dtype_name}, {_human_size(plan.total_bytes)} |
| default `trim_ratio` | {trim} |
| image token | `{IMAGE_TOKEN}` = {config.image_token_id}; padding `{PAD_TOKEN}` = {config.text_config.pad_token_id} |

Every source tensor is copied bit for bit or, where its dtype differs, cast to {dtype_name}{fp32_note}.
`{IMAGE_TOKEN}` and `{PAD_TOKEN}` were added to the tokenizer; their embedding and output rows are the mean of the
existing rows, and `generation_config.json` suppresses them (`suppress_tokens`), so they are never generated.
Command:

```bash
{command}
```

## License

The weights keep the license of `{llava_name}` ({license_name}); CLIP's parts keep CLIP's. The code files
(`*_llava_trim.py`) are under the Apache License 2.0 (see `LICENSE`).

## Citation

```bibtex
@article{{song2024trim,
  title   = {{Less is More: A Simple yet Effective Token Reduction Method for Efficient Multi-modal LLMs}},
  author  = {{Song, Dingjie and Wang, Wenjun and Chen, Shunian and Wang, Xidong and Guan, Michael and Wang, Benyou}},
  journal = {{arXiv preprint arXiv:2409.10994}},
  year    = {{2024}}
}}
```
"""
    ModelCard(content).save(folder / "README.md")
    shutil.copyfile(_package_file("LICENSE"), folder / "LICENSE")


# ---------------------------------------------------------------------------------------------------------------------
# Verification
# ---------------------------------------------------------------------------------------------------------------------


def _bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same shape, dtype and bytes (NaNs included)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if a.dtype.is_floating_point:
        as_int = {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.int8}[a.dtype.itemsize]
        return torch.equal(a.reshape(-1).view(as_int), b.reshape(-1).view(as_int))
    return torch.equal(a, b)


def verify_output(plan: ConversionPlan, folder: Path) -> dict:
    """
    Check a written repository: every source tensor arrived bit for bit (or exactly cast to the output dtype), the
    added rows are as planned, the model loads with `trust_remote_code` without missing or unexpected weights and
    holds exactly the file contents, and one forward pass on an image gives finite logits.

    Raises:
        `ConversionError`: on the first mismatch.
    """
    from PIL import Image, ImageDraw
    from transformers import AutoModelForImageTextToText, AutoProcessor

    weight_map = _output_weight_map(folder)
    output_handles = {name: safe_open(folder / name, framework="pt") for name in set(weight_map.values())}
    cast = 0
    for path in dict.fromkeys(t.file for t in plan.tensors):
        with WeightReader(path) as reader:
            for planned in (t for t in plan.tensors if t.file == path):
                source = reader.get(planned.source_name)
                written = output_handles[weight_map[planned.target]].get_tensor(planned.target)
                rows = planned.source_shape[0] if planned.grows_rows else None
                kept = written[:rows] if rows is not None else written
                if source.dtype != planned.dtype:
                    cast += 1
                if not _bits_equal(kept, source.to(planned.dtype)):
                    raise ConversionError(f"Verification failed: {planned.target} differs from {planned.source_name}.")
                if rows is not None:
                    mean = source.float().mean(dim=0, keepdim=True).to(planned.dtype)
                    if not _bits_equal(written[rows:], mean.expand(written.shape[0] - rows, -1).contiguous()):
                        raise ConversionError(f"Verification failed: the added rows of {planned.target} are wrong.")

    model, info = AutoModelForImageTextToText.from_pretrained(
        folder, trust_remote_code=True, dtype=plan.dtype, output_loading_info=True
    )
    problems = {key: sorted(value) for key, value in info.items() if value and key != "error_msgs"}
    if problems or info.get("error_msgs"):
        raise ConversionError(f"Verification failed: loading {folder} reported {problems or info['error_msgs']}.")
    for name, tensor in model.state_dict().items():
        stored = output_handles[weight_map[name]].get_tensor(name)
        if not _bits_equal(tensor, stored.to(tensor.dtype)) or not _bits_equal(tensor.to(stored.dtype), stored):
            raise ConversionError(f"Verification failed: the loaded model's {name} differs from the file.")
    del output_handles

    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    require_files(
        folder / "clip_tokenizer",
        "Verification failed:",
        "saved CLIP tokenizer",
        CLIP_TOKENIZER_FILES,
        fix="The processor would read questions with the Llama tokenizer: convert again.",
    )
    check_clip_tokenizer(processor.clip_tokenizer, f"the output's clip_tokenizer/ ({folder})")
    question_ids = processor.clip_tokenizer(ROUND_TRIP_QUESTION)["input_ids"]
    if question_ids != plan.clip_tokenizer(ROUND_TRIP_QUESTION)["input_ids"]:
        raise ConversionError(
            f"Verification failed: the saved CLIP tokenizer of {folder} encodes a question differently from --clip's."
        )
    image = Image.new("RGB", (480, 360), (70, 130, 200))
    ImageDraw.Draw(image).rectangle((120, 150, 380, 260), fill=(200, 30, 30))
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is in the image?"}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(images=[image], text=prompt, return_tensors="pt")
    model.eval()
    with torch.no_grad():
        output = model(**inputs)
    logits = output.logits
    if not torch.isfinite(logits).all():
        raise ConversionError("Verification failed: the forward pass gave non-finite logits.")
    selection = output.trim_selection
    kept = int(selection.num_kept[0]) if selection is not None and selection.trim_ratio is not None else None
    summary = {
        "tensors": len(plan.tensors),
        "cast": cast,
        "logits_shape": tuple(logits.shape),
        "kept_image_tokens": kept,
        "image_tokens": plan.config.image_seq_length,
    }
    cast_note = f" ({cast} of them as the source cast to the output dtype)" if cast else ""
    print(f"verify: {len(plan.tensors)} tensors match the sources bit for bit{cast_note}")
    print("verify: loads with AutoModelForImageTextToText + trust_remote_code: no missing or unexpected weights")
    trim_note = f"TRIM kept {kept}/{plan.config.image_seq_length} image tokens" if kept is not None else "TRIM off"
    print(f"verify: the CLIP tokenizer gives back {ROUND_TRIP_QUESTION!r}")
    print(f"verify: forward pass OK: logits {tuple(logits.shape)}, finite; {trim_note}")
    return summary


def _output_weight_map(folder: Path) -> dict[str, str]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        return json.loads(index.read_text())["weight_map"]
    with safe_open(folder / "model.safetensors", framework="pt") as handle:
        return dict.fromkeys(handle.keys(), "model.safetensors")


# ---------------------------------------------------------------------------------------------------------------------
# The Hub
# ---------------------------------------------------------------------------------------------------------------------


def push_to_hub(folder: Path, repo_id: str, private: bool = False, revision: str | None = None) -> str:
    """
    Create `repo_id` (if needed) and upload `folder` in one commit; returns the commit URL.

    Raises:
        `ConversionError`: without a Hugging Face token, or when the Hub cannot be reached; `folder` stays complete.
    """
    import huggingface_hub

    hint = f"The converted model is complete in {folder}; upload it later with `hf upload {repo_id} {folder}`."
    if huggingface_hub.get_token() is None:
        raise ConversionError(f"No Hugging Face token: log in with `hf auth login` or set HF_TOKEN. {hint}")
    try:
        huggingface_hub.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        if revision and revision != "main":
            huggingface_hub.create_branch(repo_id, branch=revision, exist_ok=True, repo_type="model")
        commit = huggingface_hub.upload_folder(
            repo_id=repo_id,
            folder_path=folder,
            repo_type="model",
            revision=revision,
            commit_message="Add LLaVA-1.5 + TRIM weights, processor and code (convert_checkpoint.py)",
        )
    except Exception as error:
        raise ConversionError(f"Pushing to {repo_id} failed ({type(error).__name__}: {error}). {hint}") from None
    return str(getattr(commit, "commit_url", commit))


# ---------------------------------------------------------------------------------------------------------------------
# The whole conversion
# ---------------------------------------------------------------------------------------------------------------------


def _check_output(output: Path, overwrite: bool, sources: list[Path]) -> None:
    """Refuse an output that is a file, a non-empty folder without `--overwrite`, or a source (or inside one)."""
    for source in sources:
        if output == source or source in output.parents or output in source.parents:
            raise ConversionError(f"--output {output} overlaps the source folder {source}: choose another folder.")
    if output.is_file():
        raise ConversionError(f"--output {output} is a file: pass a folder path.")
    existing = next(parent for parent in output.parents if parent.exists())
    if not existing.is_dir():
        raise ConversionError(f"--output {output}: {existing} is a file, not a folder. Choose another --output.")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConversionError(
            f"--output {output}: the folder {existing} is not writable: choose another --output or fix its "
            "permissions."
        )
    if output.is_dir() and any(output.iterdir()) and not overwrite:
        raise ConversionError(f"--output {output} exists and is not empty: pass --overwrite to replace it.")


def convert(args: argparse.Namespace) -> Path:
    """Run the conversion the parsed command line asks for; returns the output folder."""
    output = Path(args.output).expanduser().resolve()
    llava_folder = resolve_source(args.llava, "--llava")
    clip_folder = resolve_source(args.clip, "--clip")
    _check_output(output, args.overwrite, [llava_folder, clip_folder])

    llava = read_llava_source(llava_folder)
    plan = plan_conversion(
        llava, clip_folder, trim_ratio=args.trim_ratio, dtype=DTYPES.get(args.dtype) if args.dtype else None
    )

    created_parents = [p for p in reversed(output.parents) if not p.exists()]
    staging = None
    started = time.perf_counter()
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.", suffix=".partial", dir=output.parent))
        write_weights(plan, staging, args.max_shard_size)
        write_config(plan, staging)
        write_generation_config(plan, staging)
        write_processor(plan, staging)
        model_id = args.push_to_hub or str(output)
        base_models = args.base_model or [n for n in (args.llava, args.clip) if not Path(n).expanduser().exists()]
        write_model_card(
            plan, staging, model_id, args.llava, args.clip, args.license, base_models, _command_line(args)
        )
        if args.verify:
            verify_output(plan, staging)
        _publish_permissions(staging)
        _replace_folder(staging, output)
    except BaseException:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
        for parent in reversed(created_parents):
            with contextlib.suppress(OSError):
                parent.rmdir()
        raise
    seconds = time.perf_counter() - started
    print(f"Wrote {output} ({_human_size(plan.total_bytes)} of weights in {seconds:.1f} s)")

    if args.push_to_hub:
        url = push_to_hub(output, args.push_to_hub, private=args.private, revision=args.revision)
        print(f"Pushed to https://huggingface.co/{args.push_to_hub} ({url})")
    return output


def _human_size(size: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.1f} {unit}" if unit != "B" else f"{int(size)} B"
        size /= 1000
    return f"{size:.1f} GB"


def _publish_permissions(folder: Path) -> None:
    """Give the temporary folder (created private) and its files the permissions the user's umask asks for."""
    umask = os.umask(0)
    os.umask(umask)
    for path in [folder, *folder.rglob("*")]:
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


def _replace_folder(staging: Path, output: Path) -> None:
    """Move the finished `staging` folder to `output`; an existing `output` is removed only after the move."""
    if not output.exists():
        staging.rename(output)
        return
    retired = output.with_name(f".{output.name}.{staging.name.rsplit('.', 2)[-2]}.old")
    output.rename(retired)
    try:
        staging.rename(output)
    except BaseException:
        retired.rename(output)
        raise
    shutil.rmtree(retired, ignore_errors=True)


def _command_line(args: argparse.Namespace) -> str:
    parts = ["python convert_checkpoint.py", f"--llava {args.llava}", f"--clip {args.clip}"]
    if args.trim_ratio is not FROM_SOURCE:
        parts.append(f"--trim-ratio {'none' if args.trim_ratio is None else args.trim_ratio}")
    if args.dtype:
        parts.append(f"--dtype {args.dtype}")
    parts.append("--output OUTPUT")
    return " ".join(parts)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="convert_checkpoint.py",
        description=(
            "Convert a LLaVA-1.5 checkpoint (original liuhaotian, FreedomIntelligence TRIM, or llava-hf) plus CLIP\n"
            "into a LLaVA-TRIM model repository that loads with trust_remote_code=True, optionally verified and\n"
            "pushed to the Hub. The output is written to a temporary folder beside --output and renamed on success:\n"
            "a failed or refused conversion leaves nothing behind."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="""examples:
  # original LLaVA-1.5 + CLIP from the Hub, checked after writing
  python convert_checkpoint.py --llava liuhaotian/llava-v1.5-7b --output llava-v1.5-7b-trim --verify

  # the TRIM-finetuned checkpoint (CLIP towers embedded, TRIM:-1 in its config), pushed to a private repository
  python convert_checkpoint.py --llava FreedomIntelligence/llava-v1.5-7b-TRIM --output llava-v1.5-7b-trim-ft \\
      --push-to-hub your-name/llava-v1.5-7b-trim --private --revision main --license apache-2.0

  # local llava-hf folder, bfloat16, a fixed quarter of the image tokens, 2 GB shards, replacing an old output
  python convert_checkpoint.py --llava ./llava-1.5-7b-hf --clip ./clip-vit-large-patch14-336 --dtype bfloat16 \\
      --trim-ratio 0.25 --max-shard-size 2GB --output ./out --overwrite --base-model llava-hf/llava-1.5-7b-hf
""",
    )
    parser.add_argument(
        "--llava",
        required=True,
        metavar="SRC",
        help="LLaVA-1.5 checkpoint: local folder or Hub id (e.g. liuhaotian/llava-v1.5-7b, "
        "FreedomIntelligence/llava-v1.5-7b-TRIM, llava-hf/llava-1.5-7b-hf).",
    )
    parser.add_argument(
        "--clip",
        default=DEFAULT_CLIP,
        metavar="CLIP",
        help=f"Full CLIP model (folder or Hub id) for the TRIM scorer, tokenizer and image processor, and the vision "
        f"tower when the source has none (default: {DEFAULT_CLIP}).",
    )
    parser.add_argument("--output", required=True, metavar="DIR", help="Folder to write (e.g. ./llava-v1.5-7b-trim).")
    parser.add_argument(
        "--trim-ratio",
        type=parse_trim_ratio,
        default=FROM_SOURCE,
        metavar="R",
        help="Default TRIM mode stored in the config: -1/auto (IQR outliers), a fraction in (0, 1] (e.g. 0.25), or "
        "none (plain LLaVA). Default: the source's mm_vision_token_reduce_func ('TRIM:-1' -> -1), else -1.",
    )
    parser.add_argument(
        "--dtype",
        choices=sorted(DTYPES),
        default=None,
        help="Cast every weight to this dtype (e.g. --dtype bfloat16). Default: keep the LLaVA source's dtype.",
    )
    parser.add_argument(
        "--max-shard-size",
        type=parse_size,
        default=parse_size("5GB"),
        metavar="SIZE",
        help="Largest output shard, e.g. 5GB (default), 2GB, 500MB, 2GiB.",
    )
    parser.add_argument("--overwrite", action="store_true", help="Replace --output if it exists and is not empty.")
    parser.add_argument(
        "--verify",
        action="store_true",
        help="Before finishing: reload the output, check every tensor bit for bit against the sources and run one "
        "forward pass (loads the whole model in memory).",
    )
    parser.add_argument(
        "--push-to-hub",
        metavar="REPO_ID",
        default=None,
        help="After writing, create this Hub repository (e.g. your-name/llava-v1.5-7b-trim) and upload the folder. "
        "Needs `hf auth login` or HF_TOKEN.",
    )
    parser.add_argument("--private", action="store_true", help="With --push-to-hub: create the repository private.")
    parser.add_argument(
        "--revision", default=None, help="With --push-to-hub: branch to push to (e.g. --revision v1; created if new)."
    )
    parser.add_argument(
        "--license",
        default=None,
        help="License in the model card metadata (e.g. llama2). Default: the source model card's, else llama2.",
    )
    parser.add_argument(
        "--base-model",
        action="append",
        default=None,
        metavar="REPO_ID",
        help="base_model in the model card (repeatable, e.g. --base-model liuhaotian/llava-v1.5-7b). Default: "
        "--llava and --clip when they are Hub ids.",
    )
    return parser


class Interrupted(KeyboardInterrupt):
    """A termination signal (SIGINT, SIGTERM, SIGHUP) arrived: the conversion stops and cleans up as for Ctrl-C."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


TERMINATION_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name))


@contextlib.contextmanager
def _signals_raise_interrupted():
    """
    Turn termination signals into `Interrupted` while the conversion runs (main thread only), so that `convert`'s
    clean-up runs for `timeout`, schedulers and container stops as it does for Ctrl-C. After the first signal the
    others are ignored until the clean-up is done.
    """
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        for number in TERMINATION_SIGNALS:
            signal.signal(number, signal.SIG_IGN)
        raise Interrupted(signum)

    previous = {number: signal.signal(number, interrupt) for number in TERMINATION_SIGNALS}
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


def describe_os_error(error: OSError) -> str:
    """One line for a file-system error: what failed, on which path, and what to do."""
    import errno

    where = f" ({error.filename})" if error.filename else ""
    what = error.strerror or str(error) or type(error).__name__
    if error.errno == errno.ENOSPC:
        fix = "free some disk space or choose another --output"
    elif error.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        fix = "choose another --output or fix the permissions"
    else:
        fix = "check the paths and the disk"
    return f"{what}{where}: {fix}. Nothing was written."


def main(argv: list[str] | None = None) -> int:
    """
    Command-line entry point; returns the exit status: 0 on success, 1 on a refused or failed conversion, 128 + the
    signal number when interrupted (130 for Ctrl-C, 143 for SIGTERM). Every failure is one line on stderr and leaves
    no output behind.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    if (args.private or args.revision) and not args.push_to_hub:
        parser.error("--private and --revision only apply with --push-to-hub REPO_ID")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        with _signals_raise_interrupted():
            convert(args)
    except ConversionError as error:
        message, status = str(error), 1
    except KeyboardInterrupt as interrupt:
        signum = getattr(interrupt, "signum", signal.SIGINT)
        message, status = f"interrupted by {signal.Signals(signum).name}: nothing was written.", 128 + signum
    except OSError as error:
        message, status = describe_os_error(error), 1
    except Exception as error:
        logger.debug("Conversion failed", exc_info=True)
        message, status = f"unexpected {type(error).__name__}: {error}. Nothing was written.", 1
    else:
        return 0
    print(f"error: {' '.join(message.split())}", file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main())
