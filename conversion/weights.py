# Copyright 2026 The llava-trim authors. Licensed under the Apache License, Version 2.0.
"""Weight files of a checkpoint folder (single files, shards, indexes) and lazy access to the tensors they hold."""

import contextlib
import json
import re
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors import safe_open

from . import ConversionError


def read_json(path: Path) -> dict:
    """A JSON file of a source folder; a missing or malformed one is a `ConversionError` naming it."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConversionError(f"{path} is missing: the folder is not a complete checkpoint.") from None
    except json.JSONDecodeError as error:
        raise ConversionError(f"{path} is not valid JSON ({error}): download it again.") from None


class WeightFiles(NamedTuple):
    """The weight files of one folder, in load order, and per file the tensor names its index assigns to it."""

    paths: list[Path]
    indexed: dict[Path, set[str]]  # empty when the folder has no index


_SHARD_RE = re.compile(r"-(\d+)-of-(\d+)\.(?:safetensors|bin)$")


def find_weight_files(folder: Path) -> WeightFiles:
    """
    The weight files of a checkpoint folder and what its index says each holds.

    Looks for `model.safetensors.index.json`, `pytorch_model.bin.index.json`, `model.safetensors`,
    `pytorch_model.bin`, then unindexed `model-0000k-of-0000n.safetensors` / `pytorch_model-0000k-of-0000n.bin` shards.

    Raises:
        `ConversionError`: when the folder has no weights, or an index or the shard numbering names a missing file.
    """
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index_path = folder / index_name
        if index_path.is_file():
            weight_map = read_json(index_path).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise ConversionError(f"{index_path} has no 'weight_map': download the index again.")
            names = sorted(set(weight_map.values()))
            missing = [name for name in names if not (folder / name).is_file()]
            if missing:
                raise ConversionError(
                    f"{index_path} names {len(missing)} weight file(s) that are not in {folder}: "
                    f"{', '.join(missing)}. The download is incomplete: download the missing shard(s) again."
                )
            indexed = {folder / name: {key for key, file in weight_map.items() if file == name} for name in names}
            return WeightFiles([folder / name for name in names], indexed)
    for single in ("model.safetensors", "pytorch_model.bin"):
        if (folder / single).is_file():
            return WeightFiles([folder / single], {})
    shards = sorted(folder.glob("model-*-of-*.safetensors")) or sorted(folder.glob("pytorch_model-*-of-*.bin"))
    if shards:
        _check_shard_numbering(folder, shards)
        return WeightFiles(shards, {})
    raise ConversionError(
        f"No weights found in {folder}: expected model.safetensors, pytorch_model.bin, or their shards with an index."
    )


def _check_shard_numbering(folder: Path, shards: list[Path]) -> None:
    """Refuse unindexed shards `-0000k-of-0000n` with a gap in `k`, naming the missing ones."""
    matches = [m for m in map(_SHARD_RE.search, (s.name for s in shards)) if m]
    totals = {int(m.group(2)) for m in matches}
    present = {int(m.group(1)) for m in matches}
    if len(totals) != 1:
        return
    total = totals.pop()
    missing = sorted(set(range(1, total + 1)) - present)
    if missing:
        pattern = re.sub(r"-\d+-of-", "-{:05d}-of-", shards[0].name)
        names = [pattern.format(i) for i in missing]
        raise ConversionError(
            f"{folder} holds {len(present)} of {total} weight shards; missing: {', '.join(names)}. "
            "Download the missing shard(s) again."
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
                self._tensors = torch_load(path)
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


def torch_load(path: Path) -> dict[str, torch.Tensor]:
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


class SourceTensor(NamedTuple):
    """One tensor of a source file, known by its metadata only."""

    file: Path
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype


def scan_tensors(weights: WeightFiles) -> list[SourceTensor]:
    """Names, shapes and dtypes of every tensor in `weights` (no data read), checked against the index."""
    tensors = []
    for path in weights.paths:
        with WeightReader(path) as reader:
            names = reader.keys()
            missing = sorted(weights.indexed.get(path, set()) - set(names))
            if missing:
                raise ConversionError(
                    f"{path} lacks {len(missing)} tensor(s) its index assigns to it (e.g. {missing[0]}): the "
                    "shard is truncated or from another download. Download it again."
                )
            tensors += [SourceTensor(path, name, reader.shape(name), reader.dtype(name)) for name in names]
    return tensors
