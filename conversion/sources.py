# Copyright 2026 The llava-trim authors. Licensed under the Apache License, Version 2.0.
"""Reading and checking the source folders: where they are, their configs, tokenizers and weight files."""

import contextlib
import logging
import re
from dataclasses import dataclass
from pathlib import Path

from ..configuration_llava_trim import check_trim_ratio
from . import ConversionError
from .layouts import ORIGINAL_LLAVA, SourceLayout, detect_layout
from .weights import WeightFiles, find_weight_files, read_json

logger = logging.getLogger("llava_trim.convert_checkpoint")

DEFAULT_CLIP = "openai/clip-vit-large-patch14-336"
IMAGE_TOKEN = "<image>"
PAD_TOKEN = "<pad>"
CLIP_TOKENIZER_FILES = [("vocab.json", "merges.txt"), ("tokenizer.json",)]
LLAMA_TOKENIZER_FILES = [("tokenizer.model",), ("tokenizer.json",)]
# A question the CLIP tokenizer must give back (CLIP lowercases and splits off punctuation: compared without spaces)
ROUND_TRIP_QUESTION = "What is the colour of the bus?"
MIN_CLIP_VOCAB = 256  # a byte-level BPE has at least the 256 byte symbols


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


@contextlib.contextmanager
def quiet_transformers():
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


# ---------------------------------------------------------------------------------------------------------------------
# The LLaVA side
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class LlavaSource:
    """
    The LLaVA side of a conversion: one checkpoint folder, or a language model folder plus a pretrain projector.

    `config` holds the LLaVA settings (`mm_*`, or the llava-hf config), `llm_config` the one the language model's
    settings are read from (the same dict except for a language model plus a projector). `folder` holds the Llama
    tokenizer and the generation config; `names` maps each source's flag to the name the user gave (`--llava`
    first, or `--language-model` then `--projector`).
    """

    layout: SourceLayout
    config: dict
    llm_config: dict
    folder: Path
    weights: WeightFiles
    names: dict[str, str]

    @property
    def folders(self) -> list[Path]:
        return sorted({path.parent for path in self.weights.paths} | {self.folder})


def read_llava_source(folder: Path, name: str) -> LlavaSource:
    """
    Read and check a LLaVA checkpoint's `config.json` (as raw JSON: the original format is not the transformers one).

    Raises:
        `ConversionError`: for what this model cannot represent: a non-Llama LLM, a projector other than
        `mlp2x_gelu`, `anyres`, `mm_use_im_start_end` / `mm_use_im_patch_token`, CLS features, or an unknown layout.
    """
    config = read_json(folder / "config.json")
    layout = detect_layout(config)
    layout.check(config, folder)
    return LlavaSource(layout, config, config, folder, find_weight_files(folder), {"--llava": name})


PROJECTOR_FILE = "mm_projector.bin"


def read_language_model_source(
    language_model_folder: Path, language_model_name: str, projector_folder: Path, projector_name: str
) -> LlavaSource:
    """
    The starting point of LLaVA-1.5's second training stage: a plain Llama checkpoint (`lmsys/vicuna-7b-v1.5`: its
    `config.json`, weights and tokenizer) plus the projector LLaVA's pretrain stage saves (`mm_projector.bin`, keys
    `model.mm_projector.{0,2}.{weight,bias}`, with the LLaVA `config.json` of that stage). The projector's config
    gives the LLaVA settings and is checked as an original LLaVA checkpoint's; the language model's gives the Llama
    settings.

    Raises:
        `ConversionError`: a non-Llama language model, a projector folder without `mm_projector.bin` or with
        settings this model cannot represent, or a projector built for another hidden size.
    """
    llm_config = read_json(language_model_folder / "config.json")
    model_type = llm_config.get("model_type")
    architectures = llm_config.get("architectures") or []
    if model_type != "llama" or any(a != "LlamaForCausalLM" for a in architectures):
        raise ConversionError(
            f"--language-model {language_model_folder} is not a Llama checkpoint (model_type={model_type!r}, "
            f"architectures={architectures}): only Llama-based language models (e.g. lmsys/vicuna-7b-v1.5) are "
            "supported."
        )
    require_files(projector_folder, "--projector", "pretrain projector", [(PROJECTOR_FILE, "config.json")])
    config = read_json(projector_folder / "config.json")
    ORIGINAL_LLAVA.check(config, projector_folder)
    for key in ("hidden_size", "num_hidden_layers", "vocab_size"):
        if key in config and key in llm_config and config[key] != llm_config[key]:
            raise ConversionError(
                f"--projector {projector_folder} was trained on a language model with {key}={config[key]}, but "
                f"--language-model {language_model_folder} has {key}={llm_config[key]}: pass the language model "
                f"the projector was trained with (its config names {config.get('_name_or_path')!r})."
            )
    language_model = find_weight_files(language_model_folder)
    weights = WeightFiles([*language_model.paths, projector_folder / PROJECTOR_FILE], language_model.indexed)
    names = {"--language-model": language_model_name, "--projector": projector_name}
    return LlavaSource(ORIGINAL_LLAVA, config, llm_config, language_model_folder, weights, names)


def load_llama_tokenizer(folder: Path, flag: str):
    """The Llama tokenizer of `folder` with `<image>` and `<pad>` added (special tokens), padding on the left."""
    from transformers import AddedToken, AutoTokenizer

    from ..processing_llava_trim import add_image_token

    require_files(folder, flag, "Llama tokenizer", LLAMA_TOKENIZER_FILES)
    try:
        with quiet_transformers():  # it also reads config.json, which is not a transformers config in most sources
            tokenizer = AutoTokenizer.from_pretrained(folder)
    except Exception as error:
        raise ConversionError(
            f"Could not load the tokenizer of {folder} ({error}): the folder needs tokenizer.model or "
            "tokenizer.json with tokenizer_config.json."
        ) from None
    vocab = tokenizer.get_vocab()
    add_image_token(tokenizer, IMAGE_TOKEN)
    if PAD_TOKEN not in vocab:
        tokenizer.add_special_tokens({"pad_token": AddedToken(PAD_TOKEN, special=True, normalized=False)})
    tokenizer.pad_token = PAD_TOKEN
    tokenizer.padding_side = "left"
    return tokenizer


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


# ---------------------------------------------------------------------------------------------------------------------
# CLIP
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class ClipSource:
    """A full CLIP checkpoint: its `CLIPConfig`, weight files, tokenizer and image processor."""

    folder: Path
    name: str
    config: object
    weights: WeightFiles
    tokenizer: object
    image_processor: object


def read_clip_source(folder: Path, name: str) -> ClipSource:
    """
    Read and check a full CLIP checkpoint: a `CLIPConfig` (vision and text towers), its tokenizer files (a tokenizer
    that round-trips a question), its image processor settings and its weight files.

    Raises:
        `ConversionError`: naming what is missing or wrong.
    """
    from transformers import AutoConfig, AutoImageProcessor, AutoTokenizer, CLIPConfig

    try:
        config = AutoConfig.from_pretrained(folder)
    except Exception as error:
        raise ConversionError(f"Could not read the CLIP config in {folder}: {error}") from None
    if not isinstance(config, CLIPConfig):
        raise ConversionError(
            f"{folder} holds a {type(config).__name__}, not a full CLIP model: TRIM needs CLIP's text tower and both "
            f"projections (a CLIPModel checkpoint such as {DEFAULT_CLIP})."
        )
    require_files(folder, "--clip", "CLIP tokenizer", CLIP_TOKENIZER_FILES)
    require_files(folder, "--clip", "CLIP image processor settings", [("preprocessor_config.json",)])
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
        image_processor = AutoImageProcessor.from_pretrained(folder)
    except Exception as error:
        raise ConversionError(
            f"Could not load the CLIP tokenizer and image processor of {folder} ({error}): the CLIP folder needs "
            "vocab.json, merges.txt (or tokenizer.json) and preprocessor_config.json."
        ) from None
    check_clip_tokenizer(tokenizer, f"--clip {folder}")
    return ClipSource(folder, name, config, find_weight_files(folder), tokenizer, image_processor)
