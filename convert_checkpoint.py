# Copyright 2026 The llava-trim authors. Licensed under the Apache License, Version 2.0.
"""Convert a LLaVA-1.5 checkpoint and CLIP into a LLaVA-TRIM model repository that loads with `trust_remote_code`.

Sources (local folders or Hub ids):

- `--llava`: an original LLaVA-1.5 checkpoint (`liuhaotian/llava-v1.5-7b`: `.bin` shards, no CLIP weights), a TRIM
  checkpoint (`FreedomIntelligence/llava-v1.5-7b-TRIM`: safetensors shards with the CLIP towers embedded) or a
  transformers-native one (`llava-hf/llava-1.5-7b-hf`, legacy or current weight names).
- `--language-model` with `--projector`, instead of `--llava`: the starting point of LLaVA-1.5's second training
  stage, a plain Llama checkpoint (`lmsys/vicuna-7b-v1.5`) plus the projector LLaVA's pretrain stage saves
  (`liuhaotian/llava-v1.5-mlp2x-336px-pretrain-vicuna-7b-v1.5`: `mm_projector.bin` and its `config.json`).
- `--clip`: the full CLIP model (`openai/clip-vit-large-patch14-336`): its text tower and projections score the image
  patches for TRIM, its vision tower is LLaVA's unless the source embeds one, and its tokenizer and image processor
  go into the processor.

The output folder is a complete Hub repository: sharded safetensors with their index, `config.json` (with
`auto_map`), `generation_config.json`, the three `*_llava_trim.py` code files, the processor files (the CLIP
tokenizer in `clip_tokenizer/`), `LICENSE` and a model card. The steps live in `conversion/` (read the sources, plan:
map tensors, check shapes, build the config; write; verify); this file is the command line: it runs them into a
temporary folder beside `--output`, renames it on success, and turns every failure into one line on stderr.

```bash
python convert_checkpoint.py --llava liuhaotian/llava-v1.5-7b --output llava-v1.5-7b-trim --verify
```
"""

import os
import signal
import sys

# A signal during the first seconds (the imports below) ends the run with the one line any interruption gives: the
# handlers go in before the imports when this file runs as a program, and `main` takes over from them.
_START_UP_HANDLERS: dict = {}
TERMINATION_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name))

if __name__ == "__main__":

    def _stop_while_starting(signum, frame):
        sys.stderr.write(f"error: interrupted by {signal.Signals(signum).name}: nothing was written.\n")
        sys.stderr.flush()
        os._exit(128 + signum)  # nothing is written yet, and an exception could be caught by an import on its way

    _START_UP_HANDLERS = {number: signal.signal(number, _stop_while_starting) for number in TERMINATION_SIGNALS}

import argparse  # noqa: E402
import contextlib  # noqa: E402
import logging  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

if (
    not __package__
):  # run as a script (`python convert_checkpoint.py ...`): import this folder as the `llava_trim` package
    import importlib.util

    if "llava_trim" not in sys.modules:
        _root = Path(__file__).resolve().parent
        _spec = importlib.util.spec_from_file_location(
            "llava_trim", _root / "__init__.py", submodule_search_locations=[str(_root)]
        )
        sys.modules["llava_trim"] = importlib.util.module_from_spec(_spec)
        _spec.loader.exec_module(sys.modules["llava_trim"])

from llava_trim.configuration_llava_trim import parse_trim_ratio  # noqa: E402
from llava_trim.conversion import ConversionError  # noqa: E402
from llava_trim.conversion.plan import ConversionPlan, plan_conversion  # noqa: E402
from llava_trim.conversion.sources import (  # noqa: E402
    DEFAULT_CLIP,
    ClipSource,
    LlavaSource,
    read_clip_source,
    read_language_model_source,
    read_llava_source,
    resolve_source,
    trim_ratio_from_source,
)
from llava_trim.conversion.verify import verify_output  # noqa: E402
from llava_trim.conversion.write import (  # noqa: E402
    human_size,
    write_config,
    write_generation_config,
    write_model_card,
    write_processor,
    write_weights,
)
from llava_trim.tools.cli import command_parser, flag_value  # noqa: E402

logger = logging.getLogger("llava_trim.convert_checkpoint")

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class _FromSource:
    """Default of `--trim-ratio`: the source's `mm_vision_token_reduce_func`, else -1."""

    def __repr__(self) -> str:
        return "FROM_SOURCE"


FROM_SOURCE = _FromSource()


# ---------------------------------------------------------------------------------------------------------------------
# The conversion, step by step
# ---------------------------------------------------------------------------------------------------------------------


def convert(args: argparse.Namespace) -> Path:
    """Run the conversion the parsed command line asks for; returns the output folder."""
    output = Path(args.output).expanduser().resolve()
    llava, clip = read_sources(args, output)
    trim_ratio = args.trim_ratio
    if trim_ratio is FROM_SOURCE:
        from_source = trim_ratio_from_source(llava.config)
        trim_ratio = -1 if from_source == "absent" else from_source
    plan = plan_conversion(llava, clip, trim_ratio, dtype=DTYPES.get(args.dtype) if args.dtype else None)

    started = time.perf_counter()
    with staged_output(output) as staging:
        write_repository(plan, staging, args)
        if args.verify:
            verify_output(plan, staging)
    seconds = time.perf_counter() - started
    print(f"Wrote {output} ({human_size(plan.total_bytes)} of weights in {seconds:.1f} s)")

    if args.push_to_hub:
        try:
            url = push_to_hub(output, args.push_to_hub, private=args.private, revision=args.revision)
        except KeyboardInterrupt as interrupt:
            interrupt.outcome = f"the upload stopped; the converted model is complete in {output}."
            raise
        print(f"Pushed to https://huggingface.co/{args.push_to_hub} ({url})")
    return output


def read_sources(args: argparse.Namespace, output: Path) -> tuple[LlavaSource, ClipSource]:
    """Find the source folders (downloading Hub ids), check `output` against them, then read and check them."""
    if args.llava:
        llava_folders = [resolve_source(args.llava, "--llava")]
    else:
        llava_folders = [resolve_source(args.language_model, "--language-model")]
        llava_folders.append(resolve_source(args.projector, "--projector"))
    clip_folder = resolve_source(args.clip, "--clip")
    check_output(output, args.overwrite, [*llava_folders, clip_folder])
    if args.llava:
        llava = read_llava_source(llava_folders[0], args.llava)
    else:
        llava = read_language_model_source(llava_folders[0], args.language_model, llava_folders[1], args.projector)
    return llava, read_clip_source(clip_folder, args.clip)


def write_repository(plan: ConversionPlan, folder: Path, args: argparse.Namespace) -> None:
    """Every file of the output repository: weights, config and code, generation config, processor, model card."""
    write_weights(plan, folder, args.max_shard_size)
    write_config(plan, folder)
    write_generation_config(plan, folder)
    write_processor(plan, folder)
    sources = [*plan.llava.names.values(), args.clip]
    write_model_card(
        plan,
        folder,
        model_id=args.push_to_hub or str(Path(args.output).expanduser().resolve()),
        license_name=args.license,
        base_models=args.base_model or [name for name in sources if not Path(name).expanduser().exists()],
        command=command_line(args),
    )


# ---------------------------------------------------------------------------------------------------------------------
# The output folder: checked first, written in a temporary folder, renamed on success
# ---------------------------------------------------------------------------------------------------------------------


def check_output(output: Path, overwrite: bool, sources: list[Path]) -> None:
    """
    Refuse an output that is a file, under a file, in a folder that is not writable, a non-empty folder without
    `--overwrite`, or a source (or inside one).
    """
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


@contextlib.contextmanager
def staged_output(output: Path):
    """
    Yield a temporary folder beside `output`; when the block succeeds it becomes `output` (an existing one is
    replaced only then). On any failure, signals included, the temporary folder and the parents created for it are
    removed.
    """
    created_parents = [p for p in reversed(output.parents) if not p.exists()]
    staging = None
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.", suffix=".partial", dir=output.parent))
        yield staging
        _publish_permissions(staging)
        _replace_folder(staging, output)
    except BaseException:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
        for parent in reversed(created_parents):
            with contextlib.suppress(OSError):
                parent.rmdir()
        raise


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
    try:
        shutil.rmtree(retired, ignore_errors=True)
    except KeyboardInterrupt as interrupt:  # further signals are ignored until this clean-up is done
        shutil.rmtree(retired, ignore_errors=True)
        interrupt.outcome = f"{output} had been replaced by the complete conversion and is kept."
        raise


def command_line(args: argparse.Namespace) -> str:
    """The command that reproduces this conversion (shown in the model card), with `OUTPUT` for the folder."""
    parts = ["python convert_checkpoint.py"]
    if args.llava:
        parts.append(f"--llava {args.llava}")
    else:
        parts += [f"--language-model {args.language_model}", f"--projector {args.projector}"]
    parts.append(f"--clip {args.clip}")
    if args.trim_ratio is not FROM_SOURCE:
        parts.append(f"--trim-ratio {'none' if args.trim_ratio is None else args.trim_ratio}")
    if args.dtype:
        parts.append(f"--dtype {args.dtype}")
    parts.append("--output OUTPUT")
    return " ".join(parts)


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
# The command line
# ---------------------------------------------------------------------------------------------------------------------


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


EXAMPLES = """\
# original LLaVA-1.5 + CLIP from the Hub, checked after writing
python convert_checkpoint.py --llava liuhaotian/llava-v1.5-7b --output llava-v1.5-7b-trim --verify

# the TRIM-finetuned checkpoint (CLIP towers embedded, TRIM:-1 in its config), pushed to a private repository
python convert_checkpoint.py --llava FreedomIntelligence/llava-v1.5-7b-TRIM --output llava-v1.5-7b-trim-ft \\
    --push-to-hub your-name/llava-v1.5-7b-trim --private --revision main --license apache-2.0

# local llava-hf folder, bfloat16, a fixed quarter of the image tokens, 2 GB shards, replacing an old output
python convert_checkpoint.py --llava ./llava-1.5-7b-hf --clip ./clip-vit-large-patch14-336 --dtype bfloat16 \\
    --trim-ratio 0.25 --max-shard-size 2GB --output ./out --overwrite --base-model llava-hf/llava-1.5-7b-hf

# the starting point of LLaVA-1.5's second stage (fine-tuning with TRIM): Vicuna + the pretrained projector
python convert_checkpoint.py --language-model lmsys/vicuna-7b-v1.5 \\
    --projector liuhaotian/llava-v1.5-mlp2x-336px-pretrain-vicuna-7b-v1.5 --output llava-v1.5-7b-stage2-start"""


def build_parser() -> argparse.ArgumentParser:
    parser = command_parser(
        "convert_checkpoint.py",
        "Convert a LLaVA-1.5 checkpoint (original liuhaotian, FreedomIntelligence TRIM, or llava-hf) plus CLIP into a "
        "LLaVA-TRIM model repository that loads with trust_remote_code=True, optionally verified and pushed to the "
        "Hub. The output is written to a temporary folder beside --output and renamed on success: a failed or "
        "refused conversion leaves nothing behind.",
        EXAMPLES,
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--llava",
        metavar="SRC",
        help="LLaVA-1.5 checkpoint: local folder or Hub id (e.g. liuhaotian/llava-v1.5-7b, "
        "FreedomIntelligence/llava-v1.5-7b-TRIM, llava-hf/llava-1.5-7b-hf).",
    )
    source.add_argument(
        "--language-model",
        metavar="LM",
        help="Instead of --llava: a plain Llama checkpoint (folder or Hub id, e.g. lmsys/vicuna-7b-v1.5) to build the "
        "starting model of LLaVA-1.5's second training stage from, with --projector.",
    )
    parser.add_argument(
        "--projector",
        metavar="PROJ",
        help="With --language-model: the folder or Hub id holding LLaVA's pretrain-stage mm_projector.bin and its "
        "config.json (e.g. liuhaotian/llava-v1.5-mlp2x-336px-pretrain-vicuna-7b-v1.5).",
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
        type=flag_value(parse_trim_ratio, "trim_ratio"),
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
        for number, handler in previous.items():  # the handlers from before start-up, not the start-up ones
            signal.signal(number, _START_UP_HANDLERS.get(number, handler))


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
    if bool(args.language_model) != bool(args.projector):
        parser.error("--language-model and --projector go together (a Llama checkpoint plus LLaVA's mm_projector.bin)")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        with _signals_raise_interrupted():
            convert(args)
    except ConversionError as error:
        message, status = str(error), 1
    except KeyboardInterrupt as interrupt:
        signum = getattr(interrupt, "signum", signal.SIGINT)
        outcome = getattr(interrupt, "outcome", "nothing was written.")
        message, status = f"interrupted by {signal.Signals(signum).name}: {outcome}", 128 + signum
    except OSError as error:
        message, status = describe_os_error(error), 1
    except Exception as error:
        logger.debug("Conversion failed", exc_info=True)
        message, status = f"unexpected {type(error).__name__}: {str(error).rstrip('.')}. Nothing was written.", 1
    else:
        return 0
    print(f"error: {' '.join(message.split())}", file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main())
