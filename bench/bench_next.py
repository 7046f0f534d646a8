"""TRIM on LLaVA-NeXT beside LLaVA-1.5, one run: image tokens kept and prefill time against TRIM off.

    python -m bench.bench_next                  # scaled shape, CPU, batch 1; writes its section of bench/RESULTS.md

Both families share the benchmark's scaled shape (`bench/common.py`: the real 336 px / patch 14 geometry, a Llama of
width 1024, 60 text tokens) and the very same weights (the LLaVA-NeXT model is the LLaVA-1.5 one plus
`image_newline`), with TRIM's automatic mode calibrated once on the LLaVA-1.5 model. The LLaVA-NeXT image is
1000x1000 px: the 672x672 pinpoint, four tiles and the overview, 2,880 patch tokens plus 48 newlines (2,928
positions: the most an image reaches with LLaVA-NeXT's pinpoints). *ideal* = the LLM tokens of the configuration
over those of TRIM off, the cost if prefill were proportional to the tokens the language model sees.
"""

import argparse

import torch

from bench.common import (
    NOISE,
    SHAPES,
    Environment,
    build_models,
    calibrate_trim_scores,
    interleaved_medians,
    make_inputs,
    markdown_table,
    write_section,
)
from llava_trim.configuration_llava_trim import LlavaNextTrimConfig
from llava_trim.modeling_llava_trim import LlavaNextTrimForConditionalGeneration

MODES = {"off": None, "auto": -1, "0.1": 0.1, "0.21": 0.21, "0.5": 0.5}
NEXT_IMAGE_SIZE = (1000, 1000)  # (height, width): the 672x672 pinpoint, no unpadding


def next_model(model) -> LlavaNextTrimForConditionalGeneration:
    """The LLaVA-NeXT model holding `model`'s weights (shared tensors) plus a random `image_newline`."""
    config = LlavaNextTrimConfig(**{k: v for k, v in model.config.to_dict().items() if k not in ("model_type",)})
    with torch.device(model.device):
        next_model = LlavaNextTrimForConditionalGeneration._from_config(config, dtype=model.dtype)
    state = dict(model.state_dict(), **{"model.image_newline": next_model.model.image_newline.detach()})
    next_model.load_state_dict(state, strict=True, assign=True)
    return next_model.eval()


def next_inputs(shape, inputs, next_model) -> dict:
    """The 1.5 prompt with its 576 placeholders replaced by the NeXT image's 2,928, and five random crops."""
    sizes = torch.tensor([NEXT_IMAGE_SIZE] * inputs.batch)
    positions = next_model.model._layouts(sizes)[0].num_positions
    ids = inputs.input_ids
    prefix, suffix = ids[:, : shape.prefix_tokens], ids[:, shape.prefix_tokens + 576 :]
    image = torch.full((inputs.batch, positions), shape.image_token_id, device=ids.device)
    input_ids = torch.cat([prefix, image, suffix], dim=1)
    generator = torch.Generator().manual_seed(2)
    crops = torch.randn(inputs.batch, 5, 3, 336, 336, generator=generator).to(ids.device, inputs.pixel_values.dtype)
    crops[:, 0] = inputs.pixel_values  # the overview: the 1.5 image
    return {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "pixel_values": crops,
        "image_sizes": sizes.to(ids.device),
        "trim_input_ids": inputs.trim_input_ids,
        "trim_attention_mask": inputs.trim_attention_mask,
    }


def busy_note() -> str:
    """A warning when other processes loaded the CPU during the kept rounds (the times are then not reliable)."""
    loads = NOISE.loads.get("next") or [0.0]
    if sum(loads) / len(loads) <= 0.5:
        return ""
    return (
        " Other processes used more than half a core on average during the measured rounds, so the prefill times "
        "and their ratios are not reliable here (the token counts are exact): rerun on a quiet machine."
    )


@torch.no_grad()
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device, dtype, shape = torch.device("cpu"), torch.float32, SHAPES["scaled"]
    environment = Environment(device, args.threads)

    model, _ = build_models(shape, device, dtype)
    calibrate_trim_scores(model, make_inputs(shape, 8, device, dtype, seed=7))
    inputs = make_inputs(shape, 1, device, dtype)
    families = {"LLaVA-1.5": (model, inputs.for_ours()), "LLaVA-NeXT": None}
    nxt = next_model(model)
    families["LLaVA-NeXT"] = (nxt, next_inputs(shape, inputs, nxt))

    functions, rows_info = {}, {}
    for family, (family_model, family_inputs) in families.items():
        for name, ratio in MODES.items():
            out = family_model(**family_inputs, trim_ratio=ratio, logits_to_keep=1)
            image_tokens = int(out.trim_selection.tokens_per_image[0])
            kept = int(out.trim_selection.num_kept[0])
            newlines = out.trim_selection.num_newlines
            rows_info[family, name] = (kept, 0 if newlines is None else int(newlines[0]), image_tokens)
            rows_info[family, name] += (int(out.compacted_attention_mask.sum()),)
            functions[f"{family} {name}"] = lambda m=family_model, i=family_inputs, r=ratio: m(
                **i, trim_ratio=r, use_cache=True, logits_to_keep=1
            )
    times = interleaved_medians(functions, device, args.repeats, label="next")

    rows = []
    for family in families:
        off = times[f"{family} off"]
        off_tokens = rows_info[family, "off"][3]
        for name in MODES:
            kept, newlines, image_tokens, llm_tokens = rows_info[family, name]
            composition = (
                f"{kept}" + (f" + {newlines} newlines" if newlines else "") + ("" if name == "off" else " + 1")
            )
            rows.append(
                [
                    family,
                    name,
                    composition,
                    image_tokens,
                    llm_tokens,
                    times[f"{family} {name}"] * 1000,
                    times[f"{family} {name}"] / off,
                    llm_tokens / off_tokens,
                ]
            )
    table = markdown_table(
        ["family", "config", "kept (+ newlines) (+ aggregate)", "image positions", "LLM tokens", "prefill ms",
         "vs off", "ideal"],
        rows,
    )  # fmt: skip
    body = (
        "Command: `python -m bench.bench_next`\n\n"
        + environment.describe()
        + "\n"
        + __doc__.split("\n\n", 2)[2].strip()
        + " Prefill = one forward pass with `use_cache=True, logits_to_keep=1`, vision tower and TRIM included; "
        f"batch 1, median of {args.repeats} interleaved repeats.\n\n"
        + table
        + f"\n\nNoise: {NOISE.summary(['next'])}.{busy_note()}\n"
    )
    write_section("TRIM bench: LLaVA-NeXT beside LLaVA-1.5 (scaled shape, cpu)", body)
    print(table)


if __name__ == "__main__":
    main()
