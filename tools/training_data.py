# Copyright 2026 The llava-trim authors. Licensed under the Apache License, Version 2.0.
"""Training data at LLaVA-1.5's scale: the conversation JSON read lazily, bad samples skipped, modality grouping.

Reading order: the lazy record index ([`LazyJsonRecords`]), the dataset ([`LlavaConversationDataset`]), the collator
wrapper that skips bad samples ([`SkipBadSamples`]), the sampler that batches text-only and image samples apart
([`ModalityGroupedSampler`]).

LLaVA-1.5's `llava_v1_5_mix665k.json` is one JSON list of 665k records (about 1 GB). [`LazyJsonRecords`] scans it once,
keeping only where each record starts and ends in the file and a length per record; a record is parsed again when it is
read, so a training process holds a few bytes per record rather than the parsed list.
"""

import codecs
import json
import logging
import os
import re
from array import array
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..processing_llava_trim import load_image

logger = logging.getLogger(__name__)

IMAGE_PLACEHOLDER = "<image>"
_ANSWER_ROLES = ("gpt", "assistant")
_NON_SPACE = re.compile(r"\S")
# what an image adds to a record's length for grouping (LLaVA counts words, plus 128 for an image)
IMAGE_LENGTH = 128


def modality_length(record: Any) -> int:
    """A record's length for [`ModalityGroupedSampler`]: its word count (+128 with an image), negative without one."""
    if not isinstance(record, dict) or not isinstance(record.get("conversations"), list):
        return 0
    words = sum(len(str(turn.get("value", "")).split()) for turn in record["conversations"] if isinstance(turn, dict))
    return words + IMAGE_LENGTH if record.get("image") else -max(words, 1)


# ---------------------------------------------------------------------------------------------------------------------
# Lazy records
# ---------------------------------------------------------------------------------------------------------------------


class LazyJsonRecords(Sequence):
    """The records of a JSON list (or JSON lines) file, parsed one at a time when read.

    Building it reads the file once, in chunks, and keeps each record's byte range and [`modality_length`] (20 bytes
    per record). Safe to use from data loader workers (each process opens the file itself).
    """

    def __init__(self, path: str | Path, chunk_size: int = 1 << 24):
        self.path = Path(path)
        self.starts, self.ends, self.lengths = array("q"), array("q"), array("i")
        with open(self.path, "rb") as handle:
            head = handle.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
            handle.seek(0)
            records = self._scan_array(handle, chunk_size) if head[:1] == b"[" else self._scan_lines(handle)
            for start, end, record in records:
                self.starts.append(start)
                self.ends.append(end)
                self.lengths.append(modality_length(record))
        self._fd: int | None = None
        self._fd_pid: int | None = None

    def _scan_lines(self, handle) -> Iterator[tuple[int, int, Any]]:
        offset = 0
        for number, line in enumerate(handle, start=1):
            if line.strip():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as error:
                    raise ValueError(
                        f"{self.path}: line {number} is not JSON ({error.msg}); the file must be a JSON list of "
                        "records, or one JSON record per line."
                    ) from None
                yield offset, offset + len(line), record
            offset += len(line)

    def _scan_array(self, handle, chunk_size: int) -> Iterator[tuple[int, int, Any]]:
        decoder, utf8 = json.JSONDecoder(), codecs.getincrementaldecoder("utf-8-sig")()
        text, pos, byte_pos, eof = "", 0, 0, False  # `byte_pos` is the file offset of `text[pos]`

        def read_more() -> None:
            nonlocal text, pos, byte_pos, eof
            chunk = handle.read(chunk_size)
            eof = not chunk
            if byte_pos == 0 and pos == 0 and chunk.startswith(codecs.BOM_UTF8):
                byte_pos = len(codecs.BOM_UTF8)
            text, pos = text[pos:] + utf8.decode(chunk, final=eof), 0

        def advance(new_pos: int) -> None:
            nonlocal pos, byte_pos
            piece = text[pos:new_pos]
            byte_pos += len(piece) if piece.isascii() else len(piece.encode("utf-8"))
            pos = new_pos

        def next_char() -> str:  # skips whitespace; "" at the end of the file
            while True:
                match = _NON_SPACE.search(text, pos)
                if match:
                    advance(match.start())
                    return text[pos]
                advance(len(text))
                if eof:
                    return ""
                read_more()

        def fail(what: str) -> ValueError:
            return ValueError(f"{self.path}: {what} at byte {byte_pos}; expected a JSON list of LLaVA records.")

        read_more()
        next_char()
        advance(pos + 1)  # "["
        first = True
        while True:
            char = next_char()
            if char == "]":
                return
            if not char:
                raise fail("the list is not closed")
            if not first:
                if char != ",":
                    raise fail(f"{char!r} instead of ',' between records")
                advance(pos + 1)
                next_char()
            while True:
                try:
                    record, end = decoder.raw_decode(text, pos)
                    break
                except json.JSONDecodeError as error:
                    if eof:
                        raise fail(f"invalid JSON ({error.msg})") from None
                    read_more()  # the record runs past the chunk read so far
            start = byte_pos
            advance(end)
            yield start, byte_pos, record
            first = False

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, index: int) -> Any:
        if not -len(self) <= index < len(self):
            raise IndexError(f"record {index} of {len(self)}")
        if self._fd is None or self._fd_pid != os.getpid():  # one descriptor per process (data loader workers)
            self._fd, self._fd_pid = os.open(self.path, os.O_RDONLY), os.getpid()
        start, end = self.starts[index], self.ends[index]
        return json.loads(os.pread(self._fd, end - start, start))

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_fd": None, "_fd_pid": None}

    def __del__(self):
        if getattr(self, "_fd", None) is not None and self._fd_pid == os.getpid():
            os.close(self._fd)


# ---------------------------------------------------------------------------------------------------------------------
# Dataset
# ---------------------------------------------------------------------------------------------------------------------


class BadSampleError(ValueError):
    """A record that cannot be trained on (its image is missing or unreadable, it has no answer, ...)."""


class LlavaConversationDataset(torch.utils.data.Dataset):
    """LLaVA's conversation records; images are opened lazily, as RGB, when an item is read.

    Args:
        data (`str`, `Path` or `list[dict]`): a JSON file (a list of records, or JSON lines), read lazily
            ([`LazyJsonRecords`]), or the records themselves.
        image_folder (`str` or `Path`, *optional*): where the records' `image` paths are relative to.
        skip_bad_samples (`bool`): a bad record (missing or unreadable image, no answer, not a LLaVA record) is
            returned as `{"id": ..., "skip_reason": "..."}` for [`SkipBadSamples`] to drop, instead of raising
            [`BadSampleError`].
    """

    def __init__(
        self, data: str | Path | list[dict], image_folder: str | Path | None = None, skip_bad_samples: bool = False
    ):
        if isinstance(data, (str, Path)):
            self.records = LazyJsonRecords(data)
            self.modality_lengths = self.records.lengths
        else:
            self.records = list(data)
            self.modality_lengths = [modality_length(record) for record in self.records]
        self.image_folder = Path(image_folder) if image_folder is not None else None
        self.skip_bad_samples = skip_bad_samples

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict[str, Any]:
        record = self.records[index]
        try:
            return self._read(record, index)
        except BadSampleError as error:
            if not self.skip_bad_samples:
                raise
            record_id = record.get("id", index) if isinstance(record, dict) else index
            return {"id": record_id, "skip_reason": str(error)}

    def _read(self, record: Any, index: int) -> dict[str, Any]:
        if not isinstance(record, dict) or not isinstance(record.get("conversations"), list):
            raise BadSampleError(
                f"Record {index} has no `conversations` list: every record looks like "
                '{"id": ..., "image": "path.jpg", "conversations": [{"from": "human", "value": ...}, ...]}.'
            )
        record_id = record.get("id", index)
        conversations = record["conversations"]
        if not any(
            isinstance(turn, dict)
            and str(turn.get("from", "")).lower() in _ANSWER_ROLES
            and isinstance(turn.get("value"), str)
            and turn["value"].strip()
            for turn in conversations
        ):
            raise BadSampleError(f"Record {record_id!r} has no answer (no non-empty `gpt` turn) to train on.")
        image = None
        if "image" in record and not isinstance(record["image"], str):
            raise BadSampleError(
                f"Record {record_id!r} has `image` = {record['image']!r}: one image path per record is supported "
                "(LLaVA-1.5's format)."
            )
        if record.get("image"):
            path = Path(record["image"])
            if self.image_folder is not None and not path.is_absolute():
                path = self.image_folder / path
            if not path.is_file():
                raise BadSampleError(f"Record {record_id!r}: image {path} not found; check `--image-folder`.")
            try:
                image = load_image(str(path))
                image.load()
            except (OSError, ValueError, SyntaxError) as error:  # PIL's errors for truncated and unknown files
                raise BadSampleError(f"Record {record_id!r}: image {path} cannot be read ({error}).") from None
        return {"id": record_id, "image": image, "conversations": conversations}


# ---------------------------------------------------------------------------------------------------------------------
# Skipping bad samples
# ---------------------------------------------------------------------------------------------------------------------

_PLACEHOLDER_CONVERSATION = [{"from": "human", "value": "Hello."}, {"from": "gpt", "value": "Hello."}]


@dataclass
class SkipBadSamples:
    """Wrap a collator so that bad samples are left out of the batch, logged and counted, and the run goes on.

    Bad are the records [`LlavaConversationDataset`] marks (`skip_reason`) and the records the collator refuses with a
    `ValueError` (for example a prompt that, with its image, is over `max_length`). The batch carries the count as
    `num_skipped_samples` (an `int`, which [`LlavaTrimTrainer`] takes out before the forward pass). A batch of bad
    samples only becomes one placeholder row with no label, so every process still runs its step (data parallel
    processes must stay in step) and the loss is unchanged.
    """

    collator: Callable[[list[dict]], dict[str, Any]]
    log: Callable[[str], None] = field(default=logger.warning)

    def __call__(self, examples: Sequence[dict[str, Any]]) -> dict[str, Any]:
        good, skipped = [], 0
        for example in examples:
            if example.get("skip_reason"):
                self.log(f"skipping a bad sample: {example['skip_reason']}")
                skipped += 1
            else:
                good.append(example)
        try:
            batch = self.collator(good) if good else None
        except ValueError:  # find the rows the collator refuses
            kept = []
            for example in good:
                try:
                    self.collator([example])
                    kept.append(example)
                except ValueError as error:
                    self.log(f"skipping a bad sample: record {example.get('id')!r}: {error}")
                    skipped += 1
            batch = self.collator(kept) if kept else None
        if batch is None:
            batch = self.collator([{"id": "placeholder", "image": None, "conversations": _PLACEHOLDER_CONVERSATION}])
            batch["labels"] = torch.full_like(batch["labels"], -100)
        batch["num_skipped_samples"] = skipped
        return batch


# ---------------------------------------------------------------------------------------------------------------------
# Modality grouping
# ---------------------------------------------------------------------------------------------------------------------


class ModalityGroupedSampler(torch.utils.data.Sampler):
    """Shuffle so that each optimiser step's samples are all text-only or all with an image (LLaVA's
    `group_by_modality_length`), with similar lengths next to each other.

    Indices of each modality are shuffled and cut into groups of `group_size` (per-device batch x processes x
    gradient accumulation: one optimiser step over every process); each group is sorted by length, longest first;
    the groups are shuffled and the two modalities' remainders make one mixed group at the end. The order depends on
    `seed` and the epoch only, so every process draws the same one.

    Args:
        lengths (`Sequence[int]`): [`modality_length`] per sample (negative for text-only samples).
        group_size (`int`): samples per optimiser step, over all processes.
        seed (`int`): shuffling seed (the Trainer's `seed`).
    """

    def __init__(self, lengths: Sequence[int], group_size: int, seed: int = 0):
        if group_size < 1:
            raise ValueError(f"`group_size` must be at least 1, got {group_size}.")
        self.lengths, self.group_size, self.seed, self.epoch = lengths, group_size, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        groups, remainder = [], []
        for with_image in (True, False):
            indices = [index for index, length in enumerate(self.lengths) if (length > 0) == with_image]
            shuffled = [indices[i] for i in torch.randperm(len(indices), generator=generator).tolist()]
            full = len(shuffled) - len(shuffled) % self.group_size
            groups += [shuffled[start : start + self.group_size] for start in range(0, full, self.group_size)]
            remainder += shuffled[full:]
        groups = [groups[i] for i in torch.randperm(len(groups), generator=generator).tolist()]
        if remainder:
            groups.append(remainder)
        for group in groups:
            yield from sorted(group, key=lambda index: -abs(self.lengths[index]))


__all__ = [
    "BadSampleError",
    "LazyJsonRecords",
    "LlavaConversationDataset",
    "ModalityGroupedSampler",
    "SkipBadSamples",
    "modality_length",
]
