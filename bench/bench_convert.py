# Copyright 2026 The llava-trim authors. Licensed under the Apache License, Version 2.0.
"""Benchmark of `convert_checkpoint.py` on a synthetic multi-GB checkpoint: throughput and peak memory.

Writes an original-format LLaVA-1.5 checkpoint (`pytorch_model-0000k-of-0000n.bin` shards with their index, the key
set of LLaVA-1.5-7B including the rotary `inv_freq` buffers, random fp16 values) scaled to `--size-gb`, plus the tiny
CLIP, then runs the converter in a subprocess for each `--max-shard-size` and reports wall time, throughput and the
converter's peak resident memory against the largest source shard and output shard.

```bash
python bench/bench_convert.py                       # ~3 GB in 4 shards, output shards of 1GB and 5GB
python bench/bench_convert.py --size-gb 6 --shards 3 --max-shard-size 2GB --workdir /data/bench
```

The source shards are read back from the page cache right after they are written (a warm cache), so the throughput
is the converter's, not the disk's read speed.
"""

import argparse
import json
import math
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import torch

from llava_trim.testing_utils.tiny_checkpoints import TINY_VISION, build_original_llava, build_tiny_clip


def llava_7b_like_shapes(size_bytes: float, vocab_size: int = 32000) -> tuple[dict, dict[str, tuple[int, ...]]]:
    """
    The tensor names and shapes of LLaVA-1.5-7B (Llama-2 layout, `mlp2x_gelu` projector from a tiny CLIP width) with
    32 layers' proportions kept and the width scaled so that the fp16 total is about `size_bytes`.
    """
    layers = 16
    # per layer: 4 h^2 attention + 3 h (2.6875 h) MLP = 12.0625 h^2; plus 2 vocab x h for embeddings and head
    a, b = layers * 12.0625, 2 * vocab_size
    hidden = int((-b + math.sqrt(b * b + 4 * a * size_bytes / 2)) / (2 * a))
    hidden -= hidden % 128
    intermediate = int(hidden * 2.6875) // 256 * 256
    heads = hidden // 128
    config = {
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": heads,
        "vocab_size": vocab_size,
        "max_position_embeddings": 4096,
        "max_length": 4096,
    }
    shapes = {"model.embed_tokens.weight": (vocab_size, hidden)}
    for i in range(layers):
        prefix = f"model.layers.{i}."
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            shapes[f"{prefix}self_attn.{name}.weight"] = (hidden, hidden)
        shapes[f"{prefix}self_attn.rotary_emb.inv_freq"] = (64,)
        shapes[f"{prefix}mlp.gate_proj.weight"] = (intermediate, hidden)
        shapes[f"{prefix}mlp.up_proj.weight"] = (intermediate, hidden)
        shapes[f"{prefix}mlp.down_proj.weight"] = (hidden, intermediate)
        shapes[f"{prefix}input_layernorm.weight"] = (hidden,)
        shapes[f"{prefix}post_attention_layernorm.weight"] = (hidden,)
    shapes["model.norm.weight"] = (hidden,)
    shapes["model.mm_projector.0.weight"] = (hidden, TINY_VISION["hidden_size"])
    shapes["model.mm_projector.0.bias"] = (hidden,)
    shapes["model.mm_projector.2.weight"] = (hidden, hidden)
    shapes["model.mm_projector.2.bias"] = (hidden,)
    shapes["lm_head.weight"] = (vocab_size, hidden)
    return config, shapes


def write_synthetic_llava(folder: Path, size_gb: float, num_shards: int) -> list[int]:
    """A tiny original-format folder (config, tokenizer) whose weights are replaced by the scaled 7B-like shards."""
    config, shapes = llava_7b_like_shapes(size_gb * 1e9)
    build_original_llava(folder, num_shards=1, config_overrides={**config, "num_attention_heads": 4})
    (folder / "pytorch_model.bin").unlink()
    raw = json.loads((folder / "config.json").read_text())
    raw.update(config)
    (folder / "config.json").write_text(json.dumps(raw, indent=2))

    sizes = {name: math.prod(shape) * (4 if name.endswith("inv_freq") else 2) for name, shape in shapes.items()}
    target = sum(sizes.values()) / num_shards
    groups, current, current_size = [], [], 0
    for name in shapes:
        if current and current_size + sizes[name] > target and len(groups) < num_shards - 1:
            groups.append(current)
            current, current_size = [], 0
        current.append(name)
        current_size += sizes[name]
    groups.append(current)

    generator = torch.Generator().manual_seed(0)
    weight_map, shard_sizes = {}, []
    for index, group in enumerate(groups, start=1):
        name = f"pytorch_model-{index:05d}-of-{len(groups):05d}.bin"
        shard = {}
        for key in group:
            if key.endswith("inv_freq"):
                shard[key] = torch.rand(shapes[key], generator=generator)
            else:
                shard[key] = torch.randn(shapes[key], generator=generator, dtype=torch.float32).to(torch.float16)
        torch.save(shard, folder / name)
        shard_sizes.append((folder / name).stat().st_size)
        weight_map.update(dict.fromkeys(group, name))
        del shard
    index = {"metadata": {"total_size": sum(sizes.values())}, "weight_map": weight_map}
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps(index, indent=2))
    return shard_sizes


def run_converter(llava: Path, clip: Path, output: Path, max_shard_size: str, verify: bool) -> dict:
    """Run the converter in a subprocess; wall time, peak RSS (kernel's high-water mark) and peak anonymous memory."""
    # the converter's own high-water mark: VmHWM of its address space at exit (getrusage's ru_maxrss would include
    # this parent's memory, since Linux carries it across fork and exec)
    wrapper = (
        "import re, runpy, sys\n"
        "sys.argv = ['convert_checkpoint.py'] + sys.argv[1:]\n"
        "code = 0\n"
        "try:\n"
        "    runpy.run_module('llava_trim.convert_checkpoint', run_name='__main__')\n"
        "except SystemExit as exit:\n"
        "    code = exit.code\n"
        "status = open('/proc/self/status').read()\n"
        "print('PEAK_RSS_KIB', re.search(r'VmHWM:\\s+(\\d+) kB', status).group(1))\n"
        "sys.exit(code)\n"
    )
    command = [
        sys.executable,
        "-c",
        wrapper,
        "--llava",
        str(llava),
        "--clip",
        str(clip),
        "--output",
        str(output),
        "--max-shard-size",
        max_shard_size,
    ] + (["--verify"] if verify else [])
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peak = {"rss": 0, "anonymous": 0}

    def sample() -> None:
        handle = psutil.Process(process.pid)
        while process.poll() is None:
            try:
                info = handle.memory_info()
            except psutil.Error:
                break
            peak["rss"] = max(peak["rss"], info.rss)
            peak["anonymous"] = max(peak["anonymous"], info.rss - info.shared)
            time.sleep(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    log, _ = process.communicate()
    wall = time.perf_counter() - start
    sampler.join()
    if process.returncode != 0:
        raise RuntimeError(f"The converter failed:\n{log}")
    written = next(line for line in log.splitlines() if line.startswith("Wrote "))
    converter_seconds = float(written.rsplit(" in ", 1)[1].removesuffix(" s)"))
    outputs = sorted(output.glob("*.safetensors"))
    return {
        "max_shard_size": max_shard_size,
        "wall_s": wall,
        "convert_s": converter_seconds,
        "output_bytes": sum(p.stat().st_size for p in outputs),
        "output_shards": len(outputs),
        "largest_output_shard": max(p.stat().st_size for p in outputs),
        "peak_rss": int(log.rsplit("PEAK_RSS_KIB", 1)[1].split()[0]) * 1024,
        "peak_rss_sampled": peak["rss"],
        "peak_anonymous_sampled": peak["anonymous"],
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-gb", type=float, default=3.0, help="Approximate source size in GB (e.g. 3).")
    parser.add_argument("--shards", type=int, default=4, help="Number of source .bin shards (e.g. 4).")
    parser.add_argument(
        "--max-shard-size", nargs="+", default=["1GB", "5GB"], help="Output shard sizes to run (e.g. 1GB 5GB)."
    )
    parser.add_argument("--workdir", type=Path, default=None, help="Where to write (default: a temporary folder).")
    parser.add_argument("--verify", action="store_true", help="Also pass --verify (loads the whole model).")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="bench-convert-", dir=args.workdir) as tmp:
        root = Path(tmp)
        started = time.perf_counter()
        clip = build_tiny_clip(root / "clip")
        shard_sizes = write_synthetic_llava(root / "llava", args.size_gb, args.shards)
        total = sum(shard_sizes)
        print(
            f"source: {len(shard_sizes)} .bin shards, {total / 1e9:.2f} GB (largest {max(shard_sizes) / 1e9:.2f} GB), "
            f"written in {time.perf_counter() - started:.0f} s"
        )
        print(
            f"machine: {platform.machine()}, {psutil.cpu_count()} cores, {psutil.virtual_memory().total / 2**30:.0f} "
            f"GiB RAM; python {platform.python_version()}, torch {torch.__version__}"
        )
        tiny = run_converter(build_original_llava(root / "tiny"), clip, root / "out-tiny", "5GB", verify=False)
        print(f"baseline: converting a tiny checkpoint peaks at {tiny['peak_rss'] / 1e9:.2f} GB RSS (the imports)")
        print(
            "| max shard size | output shards (largest) | wall | conversion | throughput | peak RSS | "
            "peak anonymous | largest source shard + largest output shard |"
        )
        print("| --- | --- | --- | --- | --- | --- | --- | --- |")
        for size in args.max_shard_size:
            output = root / f"out-{size}"
            result = run_converter(root / "llava", clip, output, size, args.verify)
            bound = max(shard_sizes) + result["largest_output_shard"]
            print(
                f"| {size} | {result['output_shards']} ({result['largest_output_shard'] / 1e9:.2f} GB) | "
                f"{result['wall_s']:.1f} s | {result['convert_s']:.1f} s | "
                f"{result['output_bytes'] / 1e9 / result['convert_s']:.2f} GB/s | "
                f"{result['peak_rss'] / 1e9:.2f} GB | {result['peak_anonymous_sampled'] / 1e9:.2f} GB | "
                f"{bound / 1e9:.2f} GB |",
                flush=True,
            )
            shutil.rmtree(output)


if __name__ == "__main__":
    main()
