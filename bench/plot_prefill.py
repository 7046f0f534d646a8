"""Prefill time against the number of image tokens TRIM keeps, with the ideal (cost proportional to LLM tokens).

    python -m bench.plot_prefill                              # CPU scaled shape, batch 1
    python -m bench.plot_prefill --shape 7b --device cuda     # 7B-shaped bf16 on a GPU

Sweeps fixed ratios from 2% to 100% plus TRIM off, automatic and native LLaVA, writes `bench/prefill_vs_kept.png`
(`prefill_vs_kept_<shape>_<device>.png` for other shapes and devices) and a section of `bench/RESULTS.md`.
"""

import argparse
import os
import statistics
from pathlib import Path

import torch
import transformers

from bench.bench_trim import Bench
from bench.common import NOISE, interleaved_medians, markdown_table, write_section

SWEEP = [0.02, 0.05, 0.1, 0.21, 0.3, 0.5, 0.75, 1.0]


def measure(bench: Bench, batch: int) -> tuple[list[dict], dict[str, float]]:
    """Prefill medians of the sweep; returns one row per point and the reference times (off, native, vision)."""
    inputs = bench.inputs[batch]
    points: dict[str, float | None] = {"off": None, "auto": -1, **{f"{r:g}": r for r in SWEEP}}
    functions = {name: bench.trim_prefill_fn(batch, ratio) for name, ratio in points.items()}
    functions["native"] = bench.prefill_fn(batch, "native")
    functions["vision tower"] = torch.no_grad()(lambda: bench.model.model.get_vision_features(inputs.pixel_values))
    times = interleaved_medians(functions, bench.device, bench.repeats(batch), label="sweep")
    rows = []
    for name, ratio in points.items():
        with torch.no_grad():
            out = bench.model(**inputs.for_ours(), trim_ratio=ratio, logits_to_keep=1)
        kept = statistics.mean(out.trim_selection.num_kept.tolist())
        image_tokens = kept + (0 if ratio is None else 1)
        llm_tokens = out.compacted_input_ids.shape[1]
        rows.append({"name": name, "image_tokens": image_tokens, "llm_tokens": llm_tokens, "ms": times[name] * 1e3})
    return rows, {k: times[k] * 1e3 for k in ("off", "native", "vision tower")}


def plot(rows: list[dict], reference: dict[str, float], text_tokens: int, title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    off = reference["off"]
    vision = reference["vision tower"]
    xs = [0, 576]
    ideal = [off * (x + text_tokens) / (576 + text_tokens) for x in xs]
    floor = [vision + (off - vision) * (x + text_tokens) / (576 + text_tokens) for x in xs]

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    fixed = [r for r in rows if r["name"] not in ("off", "auto")]
    ax.plot([r["image_tokens"] for r in fixed], [r["ms"] for r in fixed], "o-", color="C0", label="ours, fixed ratio")
    for r in fixed:
        ax.annotate(r["name"], (r["image_tokens"], r["ms"]), textcoords="offset points", xytext=(4, -11), fontsize=7)
    auto = next(r for r in rows if r["name"] == "auto")
    ax.plot(auto["image_tokens"], auto["ms"], "D", color="C2", markersize=8, label="ours, automatic (IQR)")
    ax.plot(576, off, "s", color="C3", markersize=8, label="ours, TRIM off")
    ax.plot(576, reference["native"], "x", color="k", markersize=10, label="native LLaVA")
    ax.plot(xs, ideal, "--", color="C7", label="ideal: cost proportional to LLM tokens")
    ax.plot(xs, floor, ":", color="C7", label="ideal with the vision tower's fixed cost")
    ax.set_xlabel(f"image tokens reaching the language model (|K| + 1; {text_tokens} text tokens besides)")
    ax.set_ylabel("prefill time (ms)")
    ax.set_title(title, fontsize=9)
    ax.set_xlim(0, 600)
    ax.set_ylim(0, max(max(r["ms"] for r in rows), reference["native"]) * 1.1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=["scaled", "7b"], default="scaled")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--no-write", action="store_true", help="print only, leave RESULTS.md and the PNG alone")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda needs a CUDA GPU; none is visible. Use --device cpu --shape scaled.")

    bench_args = argparse.Namespace(
        shape=args.shape, device=args.device, batches=[args.batch], repeats=args.repeats, new_tokens=32
    )
    bench = Bench(bench_args)
    rows, reference = measure(bench, args.batch)
    text_tokens = bench.shape.text_tokens
    off = reference["off"]
    table = markdown_table(
        ["config", "image tokens", "LLM tokens", "prefill ms", "vs off", "ideal vs off"],
        [
            [
                r["name"],
                f"{r['image_tokens']:g}",
                r["llm_tokens"],
                r["ms"],
                f"{r['ms'] / off:.3f}",
                f"{(r['image_tokens'] + text_tokens) / (576 + text_tokens):.3f}",
            ]
            for r in rows
        ]
        + [["native", 576, 576 + text_tokens, reference["native"], f"{reference['native'] / off:.3f}", "1.000"]],
    )
    label = f"{bench.shape.name} shape, {bench.device.type}"
    name = "prefill_vs_kept.png" if label == "scaled shape, cpu" else f"prefill_vs_kept_{args.shape}_{args.device}.png"
    path = Path(__file__).resolve().parent / name
    command = f"python -m bench.plot_prefill --shape {args.shape} --device {args.device} --batch {args.batch}"
    noise = f"Noise: {NOISE.summary(['sweep'])}.\n\n" if bench.device.type == "cpu" else ""
    body = (
        f"Command: `{command}`\n\n{bench.env.describe()}\n"
        f"Batch {args.batch}; vision tower alone {reference['vision tower']:.1f} ms. *ideal vs off* = (image tokens + "
        f"{text_tokens}) / (576 + {text_tokens}), the cost if prefill were proportional to the tokens the language "
        f"model sees. Plot: `bench/{name}`.\n\n{table}\n\n{noise}![prefill vs kept image tokens]({name})"
    )
    print(body)
    if args.no_write:
        return
    title = f"Prefill vs kept image tokens ({label}, batch {args.batch}, median of {bench.repeats(args.batch)})"
    plot(rows, reference, text_tokens, title, path)
    write_section(f"TRIM bench: prefill vs kept image tokens ({label})", body)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
