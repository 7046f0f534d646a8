"""TRIM speed and memory, side by side with native transformers LLaVA on the same weights.

One command per figure; each prints its table and writes it to `bench/RESULTS.md` (machine, versions, date):

    python -m bench.bench_trim --figure prefill      # prefill (forward to the first logits), batch 1 and 8
    python -m bench.bench_trim --figure generate     # generate 32 tokens: time to first token, end to end
    python -m bench.bench_trim --figure decode       # decode time per token
    python -m bench.bench_trim --figure throughput   # tokens/s and images/s at batch 1 and 8
    python -m bench.bench_trim --figure kv           # KV-cache bytes against the exact expected ratio
    python -m bench.bench_trim --figure memory       # peak memory of prefill and of generate
    python -m bench.bench_trim --figure overhead     # TRIM's own cost vs native fed the reduced prompt
    python -m bench.bench_trim --figure profile      # torch.profiler breakdown of the TRIM prefill
    python -m bench.bench_trim --figure targets      # everything above in one run, checked against the targets
    python -m bench.bench_trim --shape 7b --device cuda --figure targets   # 7B-shaped bf16 on a GPU

Compared configurations: `native` (transformers' `LlavaForConditionalGeneration`), ours with TRIM `off`, `auto`
(IQR outliers) and the fixed ratios 0.1, 0.21 and 0.5. The prefill plot is `python -m bench.plot_prefill`.
"""

import argparse
import functools
import os
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from torch.profiler import ProfilerActivity, profile, record_function
from torch.utils._python_dispatch import TorchDispatchMode

import llava_trim.modeling_llava_trim as modeling
from bench.common import (
    FOREIGN_LIMIT,
    NOISE,
    SHAPES,
    BenchInputs,
    Environment,
    ForeignLoad,
    GenerateTiming,
    build_models,
    cache_bytes,
    calibrate_trim_scores,
    has_section,
    human_bytes,
    interleaved_generate,
    interleaved_medians,
    make_inputs,
    markdown_table,
    parameter_bytes,
    peak_bytes,
    prefill_flops,
    wait_for_quiet,
    write_section,
)

TRIM_MODES: dict[str, float | None] = {"off": None, "auto": -1, "0.1": 0.1, "0.21": 0.21, "0.5": 0.5}
CONFIGS = ["native", *TRIM_MODES]
REDUCED = [name for name, ratio in TRIM_MODES.items() if ratio is not None]
FIGURES = ["prefill", "generate", "decode", "throughput", "kv", "memory", "overhead", "profile", "targets"]


@dataclass
class Selection:
    """What one configuration hands to the language model for one batch."""

    kept: list[int]  # |K| per image (576 when off)
    llm_length: int  # compacted prompt length (padded batch)
    input_ids: torch.LongTensor  # compacted prompt
    attention_mask: torch.LongTensor
    position_ids: torch.LongTensor | None


class Bench:
    """Models, inputs and lazily measured figures for one shape and device; figures reuse earlier measurements."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.device = torch.device(args.device)
        self.dtype = torch.bfloat16 if args.shape == "7b" else torch.float32
        self.shape = SHAPES[args.shape]
        self.env = Environment(self.device, torch.get_num_threads())
        self.label = f"{self.shape.name} shape, {self.device.type}"
        self.model, self.native = build_models(self.shape, self.device, self.dtype)
        calibration = make_inputs(self.shape, 8, self.device, self.dtype, seed=123)
        self.calibration_scale = calibrate_trim_scores(self.model, calibration)
        self.pad = self.shape.text["pad_token_id"]
        self.inputs = {b: make_inputs(self.shape, b, self.device, self.dtype) for b in args.batches}
        self._cache: dict = {}
        self._check_native_matches()

    # -- helpers ------------------------------------------------------------------------------------------------------

    def cached(self, key: tuple, compute: Callable[[], object]):
        if key not in self._cache:
            self._cache[key] = compute()
        return self._cache[key]

    def noise(self, *kinds: str) -> str:
        """The noise of the timed rounds behind a figure (CPU only)."""
        if self.device.type != "cpu":
            return ""
        labels = [f"{kind} b{batch}" for kind in kinds for batch in self.args.batches]
        return f"Noise: {NOISE.summary(labels)}."

    def repeats(self, batch: int) -> int:
        return self.args.repeats if batch == 1 else max(3, self.args.repeats - 2)

    @torch.no_grad()
    def _check_native_matches(self) -> None:
        """Ours with TRIM off must be the native model: same logits on the same prompt."""
        inputs = self.inputs[self.args.batches[0]]
        ours = self.model(**inputs.for_ours(), trim_ratio=None, logits_to_keep=1).logits.float()
        native = self.native(**inputs.for_native(), logits_to_keep=1).logits.float()
        tolerance = 1e-4 if self.dtype == torch.float32 else 5e-2
        difference = (ours - native).abs().max().item()
        if difference > tolerance * max(1.0, native.abs().max().item()):
            raise RuntimeError(f"ours with TRIM off differs from native LLaVA by {difference:g}")

    @torch.no_grad()
    def selection(self, batch: int, name: str) -> Selection:
        def compute() -> Selection:
            inputs = self.inputs[batch]
            if name == "native" or TRIM_MODES[name] is None:
                length = inputs.input_ids.shape[1]
                return Selection([576] * batch, length, inputs.input_ids, inputs.attention_mask, None)
            out = self.model(**inputs.for_ours(), trim_ratio=TRIM_MODES[name], logits_to_keep=1)
            mask = out.compacted_attention_mask
            position_ids = (mask.long().cumsum(dim=1) - 1).masked_fill(mask == 0, 0)
            return Selection(
                out.trim_selection.num_kept.tolist(), mask.shape[1], out.compacted_input_ids, mask, position_ids
            )

        return self.cached(("selection", batch, name), compute)

    # -- callables ----------------------------------------------------------------------------------------------------

    def prefill_fn(self, batch: int, name: str) -> Callable[[], object]:
        """Prefill of a named configuration: `native` or one of `TRIM_MODES`."""
        if name == "native":
            inputs = self.inputs[batch]
            return torch.no_grad()(lambda: self.native(**inputs.for_native(), use_cache=True, logits_to_keep=1))
        return self.trim_prefill_fn(batch, TRIM_MODES[name])

    def trim_prefill_fn(self, batch: int, trim_ratio: float | None) -> Callable[[], object]:
        """Prefill of our model with any `trim_ratio`: one forward with `use_cache=True, logits_to_keep=1`."""
        inputs = self.inputs[batch]

        @torch.no_grad()
        def run():
            return self.model(**inputs.for_ours(), trim_ratio=trim_ratio, use_cache=True, logits_to_keep=1)

        return run

    def reduced_native_fn(self, batch: int, name: str) -> Callable[[], object]:
        """Native LLaVA on a prompt already holding |K| + 1 image tokens per image.

        Its vision tower (called as native Llava calls it), its projector on the first |K| + 1 features of each image
        and its language model: no scoring, no selection, no compaction.
        """
        inputs, selection = self.inputs[batch], self.selection(batch, name)
        base, config = self.native.model, self.native.config
        first = torch.cat([i * 576 + torch.arange(k + 1) for i, k in enumerate(selection.kept)]).to(self.device)
        image_mask = (selection.input_ids == config.image_token_id).unsqueeze(-1)

        @torch.no_grad()
        def run():
            vision = base.vision_tower(inputs.pixel_values, output_hidden_states=config.vision_feature_layer)
            features = vision.hidden_states[config.vision_feature_layer][:, 1:]  # (batch, 576, Dv)
            image_features = base.multi_modal_projector(features.flatten(0, 1)[first])  # (sum |K|+1, hidden)
            embeds = self.native.get_input_embeddings()(selection.input_ids)
            embeds = embeds.masked_scatter(image_mask, image_features.to(embeds.dtype))
            return self.native(
                inputs_embeds=embeds,
                attention_mask=selection.attention_mask,
                position_ids=selection.position_ids,
                use_cache=True,
                logits_to_keep=1,
            )

        return run

    def generate_fn(self, batch: int, name: str) -> Callable[..., object]:
        inputs = self.inputs[batch]

        def run(**kwargs):
            if name == "native":
                return self.native.generate(**inputs.for_native(), do_sample=False, pad_token_id=self.pad, **kwargs)
            return self.model.generate(
                **inputs.for_ours(), trim_ratio=TRIM_MODES[name], do_sample=False, pad_token_id=self.pad, **kwargs
            )

        return run

    # -- measurements -------------------------------------------------------------------------------------------------

    def prefill_times(self, batch: int) -> dict[str, float]:
        """Median prefill seconds of every configuration and of native fed each reduced prompt (`ref:<mode>`)."""

        def compute():
            functions = {name: self.prefill_fn(batch, name) for name in CONFIGS}
            functions.update({f"ref:{name}": self.reduced_native_fn(batch, name) for name in REDUCED})
            return interleaved_medians(functions, self.device, self.repeats(batch), label=f"prefill b{batch}")

        return self.cached(("prefill", batch), compute)

    def generate_times(self, batch: int) -> dict[str, GenerateTiming]:
        def compute():
            functions = {name: self.generate_fn(batch, name) for name in CONFIGS}
            repeats = self.repeats(batch)
            return interleaved_generate(
                functions, self.device, self.args.new_tokens, repeats, label=f"generate b{batch}"
            )

        return self.cached(("generate", batch), compute)

    @torch.no_grad()
    def kv_bytes(self, batch: int) -> dict[str, int]:
        return self.cached(
            ("kv", batch), lambda: {name: cache_bytes(self.prefill_fn(batch, name)().cache) for name in CONFIGS}
        )

    def peaks(self, batch: int) -> dict[str, tuple[int, int]]:
        """(prefill peak, generate peak) bytes beyond weights and inputs, per configuration."""

        def compute():
            result = {}
            for name in CONFIGS:
                prefill = peak_bytes(self.prefill_fn(batch, name), self.device)
                run = functools.partial(
                    self.generate_fn(batch, name),
                    max_new_tokens=self.args.new_tokens,
                    min_new_tokens=self.args.new_tokens,
                )
                result[name] = (prefill, peak_bytes(run, self.device))
            return result

        return self.cached(("memory", batch), compute)

    # -- figures ------------------------------------------------------------------------------------------------------

    def setup_text(self) -> str:
        llm = parameter_bytes(self.model.model.language_model) + parameter_bytes(self.model.lm_head)
        vision = parameter_bytes(self.model.model.vision_tower)
        scorer = parameter_bytes(self.model.model.trim_scorer)
        balance = []
        for batch in self.args.batches:
            pixel_values = self.inputs[batch].pixel_values
            embeds = torch.randn(batch, 576 + self.shape.text_tokens, self.shape.text["hidden_size"])
            embeds = embeds.to(self.device, self.dtype)
            times = interleaved_medians(
                {
                    "vision": torch.no_grad()(lambda pv=pixel_values: self.model.model.get_vision_features(pv)),
                    "llm": torch.no_grad()(lambda e=embeds: self.model.model.language_model(inputs_embeds=e)),
                },
                self.device,
                self.repeats(batch),
                label=f"balance b{batch}",
            )
            balance.append(
                f"batch {batch}: vision tower {times['vision'] * 1e3:.1f} ms, language model on "
                f"{576 + self.shape.text_tokens} tokens {times['llm'] * 1e3:.1f} ms "
                f"({times['llm'] / times['vision']:.1f}x)"
            )
        flops = {shape.name: prefill_flops(shape) for shape in SHAPES.values()}
        flop_text = ", ".join(f"`{name}` {llm / vision:.0f}x" for name, (vision, llm) in flops.items())
        kept = {b: self.selection(b, "auto").kept for b in self.args.batches}
        kept_text = "; ".join(
            f"batch {b}: {statistics.mean(k):.1f} of 576 ({statistics.mean(k) / 576:.1%}; min {min(k)}, max {max(k)})"
            for b, k in kept.items()
        )
        return (
            f"- shape `{self.shape.name}`: {self.shape.description}\n"
            f"- dtype {str(self.dtype).removeprefix('torch.')}; weights: language model {human_bytes(llm)}, vision "
            f"tower {human_bytes(vision)}, TRIM scorer {human_bytes(scorer)}; random, seed 0\n"
            f"- cost balance (target: language model about 20x the vision tower, as in LLaVA-1.5-7B): "
            f"{'; '.join(balance)}; by FLOPs (language model / vision tower at prefill): {flop_text}\n"
            f"- prompt: {self.shape.text_tokens} text tokens + 576 image placeholders per row; the CLIP question "
            f"{self.shape.question_tokens} tokens\n"
            f"- automatic mode: the random CLIP text projection was rescaled by {self.calibration_scale:.3g} so "
            f"that it keeps about the paper's 21% on a separate calibration batch; measured on the bench images: "
            f"{kept_text}\n"
            f"- repeats: median of {self.repeats(1)} (batch 1) / {self.repeats(8)} (batch 8) interleaved runs after "
            f"one warm-up round\n"
        )

    def kept_label(self, batch: int, name: str) -> str:
        kept = self.selection(batch, name).kept
        if name in ("native", "off"):
            return "576"
        return f"{statistics.mean(kept):.0f}+1" if len(set(kept)) == 1 else f"{statistics.mean(kept):.1f}+1 (mean)"

    def figure_prefill(self) -> tuple[str, str]:
        rows = []
        for batch in self.args.batches:
            times, off = self.prefill_times(batch), self.prefill_times(batch)["off"]
            for name in CONFIGS:
                tokens = self.selection(batch, name).llm_length
                rows.append(
                    [
                        batch,
                        name,
                        self.kept_label(batch, name),
                        tokens,
                        times[name] * 1e3,
                        f"{times[name] / off:.3f}",
                        f"{tokens / self.selection(batch, 'off').llm_length:.3f}",
                    ]
                )
        table = markdown_table(
            ["batch", "config", "image tokens", "LLM tokens", "prefill ms", "vs off", "ideal (LLM tokens / off)"], rows
        )
        note = (
            "Prefill = one forward pass over the prompt with `use_cache=True, logits_to_keep=1` (what `generate` "
            "does first), vision tower and TRIM included. *ideal* = cost proportional to the tokens the language "
            "model sees."
        )
        return "prefill", f"{note}\n\n{table}\n\n{self.noise('prefill')}"

    def figure_generate(self) -> tuple[str, str]:
        rows = []
        for batch in self.args.batches:
            timings = self.generate_times(batch)
            for name in CONFIGS:
                t = timings[name]
                rows.append(
                    [
                        batch,
                        name,
                        self.kept_label(batch, name),
                        t.ttft * 1e3,
                        t.decode_per_token * 1e3,
                        t.total * 1e3,
                        f"{t.total / timings['off'].total:.3f}",
                    ]
                )
        table = markdown_table(
            [
                "batch",
                "config",
                "image tokens",
                "TTFT ms",
                "decode ms/token",
                f"gen {self.args.new_tokens} ms",
                "vs off",
            ],
            rows,
        )
        note = (
            f"`generate(max_new_tokens={self.args.new_tokens}, min_new_tokens={self.args.new_tokens}, greedy)`; TTFT "
            "and the per-token times are read from a stopping criterion called after every step."
        )
        return "generate", f"{note}\n\n{table}\n\n{self.noise('generate')}"

    def figure_decode(self) -> tuple[str, str]:
        rows = []
        for batch in self.args.batches:
            timings = self.generate_times(batch)
            off = timings["off"].decode_per_token
            for name in CONFIGS:
                t = timings[name].decode_per_token
                rows.append([batch, name, self.selection(batch, name).llm_length, t * 1e3, f"{t / off:.3f}"])
        table = markdown_table(["batch", "config", "prompt tokens in cache", "decode ms/token", "vs off"], rows)
        note = "Median time between consecutive generated tokens (31 steps per call), then median over calls."
        return "decode", f"{note}\n\n{table}\n\n{self.noise('generate')}"

    def figure_throughput(self) -> tuple[str, str]:
        rows = []
        for batch in self.args.batches:
            timings, prefill = self.generate_times(batch), self.prefill_times(batch)
            for name in CONFIGS:
                tokens_per_s = batch * self.args.new_tokens / timings[name].total
                off = batch * self.args.new_tokens / timings["off"].total
                rows.append([batch, name, tokens_per_s, f"{tokens_per_s / off:.2f}x", batch / prefill[name]])
        table = markdown_table(["batch", "config", "generated tokens/s", "vs off", "prefill images/s"], rows)
        note = f"Generated tokens/s = batch x {self.args.new_tokens} / end-to-end `generate` time."
        return "throughput", f"{note}\n\n{table}\n\n{self.noise('generate', 'prefill')}"

    def kv_check(self, batch: int, name: str) -> tuple[int, float, float, bool]:
        kv = self.kv_bytes(batch)
        off_tokens = self.selection(batch, "off").llm_length
        tokens = self.selection(batch, name).llm_length
        return kv[name], kv[name] / kv["off"], tokens / off_tokens, kv[name] * off_tokens == kv["off"] * tokens

    def figure_kv(self) -> tuple[str, str]:
        rows = []
        for batch in self.args.batches:
            for name in CONFIGS:
                value, ratio, expected, exact = self.kv_check(batch, name)
                rows.append(
                    [
                        batch,
                        name,
                        self.kept_label(batch, name),
                        self.selection(batch, name).llm_length,
                        human_bytes(value),
                        f"{ratio:.4f}",
                        f"{expected:.4f}",
                        "yes" if exact else "NO",
                    ]
                )
        table = markdown_table(
            ["batch", "config", "image tokens", "cached positions", "KV bytes", "vs off", "expected", "exact"], rows
        )
        note = (
            "Bytes of every key and value tensor in the cache after prefill. Expected = (|K| + 1 + text) / (576 + "
            "text); at batch 8 in automatic mode rows keep different counts and the cache holds the padded length "
            "(longest row)."
        )
        return "kv", f"{note}\n\n{table}"

    def figure_memory(self) -> tuple[str, str]:
        rows = []
        for batch in self.args.batches:
            peaks = self.peaks(batch)
            for name in CONFIGS:
                prefill, generate = peaks[name]
                rows.append(
                    [
                        batch,
                        name,
                        self.kept_label(batch, name),
                        human_bytes(prefill),
                        f"{prefill / peaks['off'][0]:.3f}",
                        human_bytes(generate),
                        f"{generate / peaks['off'][1]:.3f}",
                    ]
                )
        table = markdown_table(
            [
                "batch",
                "config",
                "image tokens",
                "peak prefill",
                "vs off",
                f"peak gen {self.args.new_tokens}",
                "vs off",
            ],
            rows,
        )
        how = (
            "`torch.cuda.max_memory_allocated` minus what was allocated before the call"
            if self.device.type == "cuda"
            else "bytes of live tensor storages allocated during the call, counted by a `TorchDispatchMode` (the CPU "
            "analogue of `torch.cuda.max_memory_allocated`; weights and inputs excluded, kernel scratch not seen)"
        )
        weights = parameter_bytes(self.model)
        return "memory", f"Peak memory beyond the weights ({human_bytes(weights)}): {how}.\n\n{table}"

    def figure_overhead(self) -> tuple[str, str]:
        rows = []
        for batch in self.args.batches:
            times = self.prefill_times(batch)
            for name in REDUCED:
                overhead = times[name] - times[f"ref:{name}"]
                rows.append(
                    [
                        batch,
                        name,
                        self.kept_label(batch, name),
                        times[name] * 1e3,
                        times[f"ref:{name}"] * 1e3,
                        overhead * 1e3,
                        f"{overhead / times['off']:+.1%}",
                    ]
                )
        table = markdown_table(
            ["batch", "config", "image tokens", "ours ms", "native reduced ms", "overhead ms", "of off prefill"],
            rows,
        )
        note = (
            "Native reduced = native LLaVA's vision tower, projector and language model on a prompt that already "
            "holds |K| + 1 image tokens per image (no scoring, no selection, no compaction), timed interleaved with "
            "ours. Overhead = ours - native reduced, as a share of the TRIM-off prefill. The profile section breaks "
            "the selection down directly."
        )
        return "overhead", f"{note}\n\n{table}\n\n{self.noise('prefill')}"

    def figure_profile(self) -> tuple[str, str]:
        parts = []
        for batch in self.args.batches:
            regions, top, total = profile_prefill(self.model, self.inputs[batch], -1, self.device)
            selection = sum(regions.get(k, 0.0) for k in ("trim_scorer", "trim_image_tokens", "compact_image_runs"))
            rows = [[name, ms, f"{ms / total:.1%}"] for name, ms in regions.items()]
            rows.append(["selection (scorer + keep/pack + compaction)", selection, f"{selection / total:.1%}"])
            parts.append(
                f"Batch {batch}, TRIM auto, prefill {total:.1f} ms (profiled, {self.args.profile_steps} steps "
                f"averaged):\n\n" + markdown_table(["region", "ms", "share"], rows)
            )
            parts.append(
                f"Top operators by self time (batch {batch}):\n\n"
                + markdown_table(["operator", "self ms", "calls"], [[n, ms, c] for n, ms, c in top])
            )
        for batch in self.args.batches:
            rows = []
            for name in ("native", "off", "auto"):
                with torch.no_grad(), HostSyncCounter() as counter:
                    self.prefill_fn(batch, name)()
                ours = sum(n for where, n in counter.hits.items() if "modeling_llava_trim" in where)
                where = "; ".join(f"`{k}` x{n}" for k, n in counter.hits.items())
                rows.append([name, sum(counter.hits.values()), ours, where])
            parts.append(
                f"Operators that wait for the device on a GPU (host syncs) in one prefill, batch {batch}, with the "
                "source line that issued them; `.tolist()` on a GPU tensor is one more (a device-to-host copy, "
                "invisible on CPU: `prepare_trimmed_inputs` has some):\n\n"
                + markdown_table(["config", "sync ops", "in modeling_llava_trim.py", "where"], rows)
            )
        calls = count_module_calls(self.model, functools.partial(self.generate_fn(1, "auto"), max_new_tokens=8))
        parts.append(
            "Module calls during one `generate(max_new_tokens=8)` with TRIM auto (the vision tower and the selection "
            "must run once, the language model once per step): "
            + ", ".join(f"`{name}` x{count}" for name, count in calls.items())
        )
        return "profile", "\n\n".join(parts)

    def figure_targets(self) -> tuple[str, str]:
        rows = []
        b1 = self.args.batches[0]
        for batch in self.args.batches:
            p, g = self.prefill_times(batch), self.generate_times(batch)
            rows.append(target_row(f"TRIM off vs native, prefill time (batch {batch})", p["off"] / p["native"], 1.03))
            ratio = g["off"].total / g["native"].total
            rows.append(target_row(f"TRIM off vs native, generate time (batch {batch})", ratio, 1.03))
            peaks = self.peaks(batch)
            for i, what in enumerate(("prefill", "generate")):
                ratio = peaks["off"][i] / peaks["native"][i]
                if peaks["off"][i] == peaks["native"][i]:
                    status = "met"
                else:
                    status = "met (lower than native)" if ratio < 1 else "not met"
                what = f"TRIM off vs native, peak {what} memory (batch {batch})"
                rows.append([what, f"{ratio:.4f}x", "identical", "-", status])
        ideal = self.selection(b1, "0.21").llm_length / self.selection(b1, "off").llm_length
        for batch in self.args.batches:
            p = self.prefill_times(batch)
            ratio = p["0.21"] / p["off"]
            row = target_row(f"prefill 0.21 vs off (batch {batch})", ratio, 0.40)
            row[3] = f"{ideal:.3f} (measured = {ratio / ideal:.2f}x ideal)"
            rows.append(row)
        if self.device.type == "cuda":
            for batch in self.args.batches:
                peaks = self.peaks(batch)
                rows.append(
                    [
                        f"peak memory 0.21 vs off (batch {batch})",
                        f"{peaks['0.21'][0] / peaks['off'][0]:.3f}",
                        "< 1",
                        "-",
                        "met" if peaks["0.21"][0] < peaks["off"][0] else "not met",
                    ]
                )
        for batch in self.args.batches:
            p = self.prefill_times(batch)
            for name in ("auto", "0.21"):
                share = (p[name] - p[f"ref:{name}"]) / p["off"]
                rows.append(
                    [
                        f"selection overhead, {name} (batch {batch})",
                        f"{share:+.1%}",
                        "<= 5% of off prefill",
                        "0%",
                        "met" if share <= 0.05 else "not met",
                    ]
                )
        for batch in self.args.batches:
            exact = all(self.kv_check(batch, name)[3] for name in REDUCED if batch == 1 or name != "auto")
            rows.append(
                [
                    f"KV bytes = (|K|+1+text)/(576+text) of off (batch {batch})",
                    "exact" if exact else "differs",
                    "exact",
                    "exact",
                    "met" if exact else "not met",
                ]
            )
        for batch in self.args.batches:
            g = self.generate_times(batch)
            worst = max(g[name].decode_per_token / g["off"].decode_per_token for name in REDUCED)
            rows.append(target_row(f"decode per token, slowest TRIM mode vs off (batch {batch})", worst, 1.0))
        table = markdown_table(["target", "measured", "target", "ideal", "status"], rows)
        return "targets", table


def target_row(what: str, ratio: float, limit: float) -> list[object]:
    return [what, f"{ratio:.3f}x", f"<= {limit:.2f}x", "-", "met" if ratio <= limit else "not met"]


# ---------------------------------------------------------------------------------------------------------------------
# Profiling
# ---------------------------------------------------------------------------------------------------------------------


def _labelled(function: Callable, label: str) -> Callable:
    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        with record_function(label):
            return function(*args, **kwargs)

    return wrapper


@torch.no_grad()
def profile_prefill(
    model, inputs: BenchInputs, trim_ratio: float, device: torch.device, steps: int = 3
) -> tuple[dict[str, float], list[tuple[str, float, int]], float]:
    """Profile `steps` prefills with labelled regions; return per-step region ms, top operators and total ms."""
    base = model.model
    modules = {
        "vision_tower": base.vision_tower,
        "trim_scorer": base.trim_scorer,
        "multi_modal_projector": base.multi_modal_projector,
        "language_model": base.language_model,
        "lm_head": model.lm_head,
    }
    functions = ("trim_image_tokens", "compact_image_runs")
    originals = {name: getattr(modeling, name) for name in functions}
    for label, module in modules.items():
        module.forward = _labelled(module.forward, label)
    for name in functions:
        setattr(modeling, name, _labelled(originals[name], name))

    def step():
        with record_function("prefill"):
            model(**inputs.for_ours(), trim_ratio=trim_ratio, use_cache=True, logits_to_keep=1)

    try:
        step()  # warm-up
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        for _attempt in range(3):  # on a shared CPU, redo a profile taken while other processes were busy
            wait_for_quiet(device)
            with ForeignLoad() as load, profile(activities=activities) as prof:
                for _ in range(steps):
                    step()
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
            if device.type != "cpu" or load.cores <= FOREIGN_LIMIT:
                break
    finally:
        for module in modules.values():
            del module.forward
        for name, function in originals.items():
            setattr(modeling, name, function)

    averages = prof.key_averages()
    use_device = device.type == "cuda"

    def ms(event) -> float:
        total = event.device_time_total if use_device and event.device_time_total else event.cpu_time_total
        return total / 1e3 / steps

    by_name = {event.key: event for event in averages}
    total = ms(by_name["prefill"])
    regions = {label: ms(by_name[label]) for label in [*modules, *functions] if label in by_name}
    regions["other (embeddings, scatter, checks)"] = total - sum(regions.values())  # the regions are disjoint
    labels = {"prefill", *modules, *functions}
    ops = [event for event in averages if event.key not in labels]
    ops.sort(key=lambda event: event.self_cpu_time_total, reverse=True)
    top = [(event.key, event.self_cpu_time_total / 1e3 / steps, event.count // steps) for event in ops[:10]]
    return regions, top, total


class HostSyncCounter(TorchDispatchMode):
    """Counts the operators that make the host wait for a GPU, by the source line (outside torch) that issued them:
    `.item()` / `int()` / `bool()` (`_local_scalar_dense`), `nonzero`, boolean-mask indexing, `masked_select` and
    `repeat_interleave` without `output_size`. Works on CPU, where nothing actually waits."""

    SYNCING = ("_local_scalar_dense", "nonzero", "masked_select", "repeat_interleave", "_unique2", "unique_dim")

    def __init__(self):
        super().__init__()
        self.hits: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        syncs = name in self.SYNCING and not (name == "repeat_interleave" and kwargs.get("output_size") is not None)
        if name in ("index", "index_put", "index_put_"):
            syncs = any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] or []))
        if syncs:
            frame = next(
                f
                for f in reversed(traceback.extract_stack())
                if "/torch/" not in f.filename and f.name != "__torch_dispatch__"
            )
            where = f"{Path(frame.filename).name}:{frame.lineno}"
            self.hits[where] = self.hits.get(where, 0) + 1
        return func(*args, **kwargs)


@torch.no_grad()
def count_module_calls(model, function: Callable[[], object]) -> dict[str, int]:
    """How many times the main submodules run during `function()`."""
    base = model.model
    modules = {
        "vision_tower": base.vision_tower,
        "trim_scorer": base.trim_scorer,
        "multi_modal_projector": base.multi_modal_projector,
        "language_model": base.language_model,
    }
    counts = dict.fromkeys(modules, 0)
    handles = []
    for name, module in modules.items():

        def hook(_module, _args, _output, name=name):
            counts[name] += 1

        handles.append(module.register_forward_hook(hook))
    try:
        function()
    finally:
        for handle in handles:
            handle.remove()
    return counts


# ---------------------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--figure", choices=[*FIGURES, "all"], default="all", help="which figure to measure")
    parser.add_argument("--shape", choices=list(SHAPES), default="scaled", help="scaled (CPU) or 7b (GPU)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--repeats", type=int, default=7, help="timed repeats at batch 1 (2 fewer at batch 8)")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--profile-steps", type=int, default=3)
    parser.add_argument("--no-write", action="store_true", help="print only, leave RESULTS.md alone")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda needs a CUDA GPU; none is visible. Use --device cpu --shape scaled.")
    bench = Bench(args)
    figures = FIGURES if args.figure in ("all", "targets") else [args.figure]
    command = f"python -m bench.bench_trim --shape {args.shape} --device {args.device} --figure {args.figure}"
    setup = bench.setup_text()
    print(setup)
    outputs = []
    for figure in figures:
        started = time.perf_counter()
        name, body = getattr(bench, f"figure_{figure}")()
        print(f"[{figure}: {time.perf_counter() - started:.0f} s]", file=sys.stderr, flush=True)
        outputs.append((name, body))
        print(f"\n## {name} ({bench.label})\n\n{body}\n", flush=True)
    if args.no_write:
        return
    header = f"Command: `{command}`\n\n{bench.env.describe()}{setup}"
    write_section(f"TRIM bench: setup ({bench.label})", header)
    for name, body in outputs:
        run = f"{bench.env.started:%Y-%m-%d %H:%M} UTC, setup and machine: see the setup section of the same run"
        write_section(f"TRIM bench: {name} ({bench.label})", f"Command: `{command}` ({run})\n\n{body}")
    if not has_section("TRIM bench: targets (7b shape, cuda)"):
        write_section(
            "TRIM bench: 7b shape on GPU",
            "Not measured here: this environment has no GPU. The code path exists; on a CUDA machine run\n"
            "`python -m bench.bench_trim --shape 7b --device cuda --figure targets` (7B-shaped random weights in "
            "bfloat16, batch 1 and 8; about 30 GB of GPU memory) and `python -m bench.plot_prefill --shape 7b "
            "--device cuda`.",
        )


if __name__ == "__main__":
    main()
