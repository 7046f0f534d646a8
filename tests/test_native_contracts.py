"""transformers' own model contracts, held by this model as by native Llava.

The contracts are those transformers' common model and generation tests (`ModelTesterMixin`, `GenerationTesterMixin`,
the Llava model tests) hold every Llava model to: each is checked here on this model built with `trim_ratio=None`
against native `LlavaForConditionalGeneration` built from the same config and weights, and with TRIM on where it
applies (docs/trim.md).
"""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from test_modeling_llava_trim import reference_keep
from transformers import (
    CLIPConfig,
    CLIPModel,
    CLIPTextModel,
    LlavaConfig,
    LlavaForConditionalGeneration,
)
from transformers.generation import GenerationMixin
from transformers.modeling_outputs import BaseModelOutputWithPooling

from llava_trim.configuration_llava_trim import LlavaTrimConfig
from llava_trim.modeling_llava_trim import LlavaTrimForConditionalGeneration, LlavaTrimModel
from llava_trim.testing_utils.tiny import (
    TINY_CLIP_TEXT,
    TINY_IMAGE_TOKEN_ID,
    TINY_VISION,
    native_llava,
    native_llava_config,
    tiny_config,
    tiny_model,
)

SIZE, S = 56, 16  # 4 x 4 patches: the contracts do not depend on the image size
EPS = torch.finfo(torch.float32).eps


def small_model(**overrides) -> LlavaTrimForConditionalGeneration:
    fields = dict(vision_config=dict(TINY_VISION, image_size=SIZE), image_seq_length=S, trim_ratio=None)
    return tiny_model(seed=0, **{**fields, **overrides})


@pytest.fixture(scope="module")
def model():
    return small_model()


@pytest.fixture(scope="module")
def native(model):
    return native_llava(model)


@pytest.fixture(scope="module")
def native64(native):
    return native_llava_like(native).double()


def native_llava_like(native: LlavaForConditionalGeneration) -> LlavaForConditionalGeneration:
    copy = LlavaForConditionalGeneration(native.config)
    copy.load_state_dict(native.state_dict())
    return copy.eval()


def text(n: int, seed: int) -> list[int]:
    return torch.randint(3, 900, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def prompt(prefix: int, images: int, suffix: int, seed: int) -> list[int]:
    ids = [1] + text(prefix, seed)
    for image in range(images):
        ids += [TINY_IMAGE_TOKEN_ID] * S + text(suffix, seed + 100 + image)
    return ids


def batch(rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded `input_ids` and `attention_mask`."""
    length = max(map(len, rows))
    input_ids = torch.full((len(rows), length), 1001)
    attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, length - len(row) :] = torch.tensor(row)
        attention_mask[i, length - len(row) :] = 1
    return input_ids, attention_mask


def pixels(num: int, seed: int = 0) -> torch.Tensor:
    return torch.randn((num, 3, SIZE, SIZE), generator=torch.Generator().manual_seed(seed))


def questions(num: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """One CLIP-tokenised stand-in question per image, each ending with CLIP's eos token."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 990, (num, 6), generator=generator)
    ids[:, 0], ids[:, -1] = TINY_CLIP_TEXT["bos_token_id"], TINY_CLIP_TEXT["eos_token_id"]
    return ids, torch.ones_like(ids)


def assert_float32_close(ours, reference, exact, where: torch.Tensor | None = None) -> None:
    """`ours` (float32) is as close to the float64 result `exact` as the float32 `reference` is, up to a few
    roundings of the largest value: the budget comes from the reference's own float32 error on the same input.
    `where` (an attention mask) restricts the comparison to attended positions: padding positions hold no result."""
    if where is not None:
        ours, reference, exact = (t[where.bool()] for t in (ours, reference, exact))
    exact = exact.double()
    budget = 4 * (reference.double() - exact).abs().max() + 16 * EPS * exact.abs().max()
    error = (ours.double() - exact).abs().max()
    assert error <= budget, f"max |ours - float64| = {error:.3g} > budget {budget:.3g}"


# ------------------------------------------------------------------------------------------------------------------
# 1. Image placeholders without pixel_values: TRIM off runs them as native, TRIM on refuses
# ------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_placeholders_without_images_trim_off_as_native(attn_implementation):
    ours = small_model()
    ours.set_attn_implementation(attn_implementation)
    native = native_llava(ours)
    native.set_attn_implementation(attn_implementation)
    input_ids, attention_mask = batch([prompt(3, 1, 4, seed=1), prompt(6, 1, 2, seed=2)])
    with torch.no_grad():
        logits = ours(input_ids=input_ids, attention_mask=attention_mask).logits
        expected = native(input_ids=input_ids, attention_mask=attention_mask).logits
        # float64 eager attention turns fully masked (padding) rows into NaN, which then spread: SDPA for the truth
        native64 = native_llava_like(native).double()
        native64.set_attn_implementation("sdpa")
        exact = native64(input_ids=input_ids, attention_mask=attention_mask).logits
    assert_float32_close(logits, expected, exact, where=attention_mask)
    options = dict(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=4, do_sample=False)
    assert torch.equal(ours.generate(**options), native.generate(**options))


def test_eager_and_sdpa_agree_as_native_on_placeholders_without_images():
    """transformers' eager-vs-SDPA check: both back-ends on the same inputs, ours as close as native's."""
    runs = {}
    for name, build in (("ours", small_model), ("native", lambda: native_llava(small_model()))):
        for attn in ("eager", "sdpa"):
            model = build()
            model.set_attn_implementation(attn)
            input_ids, attention_mask = batch([prompt(3, 1, 4, seed=3), prompt(1, 1, 1, seed=4)])
            with torch.no_grad():
                runs[name, attn] = model(input_ids=input_ids, attention_mask=attention_mask).logits
    ours_gap = (runs["ours", "eager"] - runs["ours", "sdpa"]).abs().max()
    native_gap = (runs["native", "eager"] - runs["native", "sdpa"]).abs().max()
    assert ours_gap <= 2 * native_gap + 16 * EPS * runs["native", "eager"].abs().max()


@pytest.mark.parametrize("rope", [{"rope_type": "linear", "factor": 2.0}, {"rope_type": "dynamic", "factor": 3.0}])
def test_rope_scaling_as_native(rope):
    """As transformers' RoPE-scaling check: scaled RoPE gives native's logits (linear scaling changes them)."""
    text_config = tiny_config().text_config.to_dict()
    text_config["rope_parameters"] = {**text_config.get("rope_parameters", {}), **rope}
    ours = small_model(text_config=text_config)
    native = native_llava(ours)
    input_ids, _ = batch([prompt(5, 1, 6, seed=5)])
    with torch.no_grad():
        logits = ours(input_ids=input_ids).logits
        expected = native(input_ids=input_ids).logits
        exact = native_llava_like(native).double()(input_ids=input_ids).logits
        unscaled = small_model()(input_ids=input_ids).logits
    assert_float32_close(logits, expected, exact)
    if rope["rope_type"] == "linear":  # dynamic scaling only acts beyond max_position_embeddings
        assert not torch.allclose(logits, unscaled)


def test_placeholders_without_images_trim_on_refused_unless_the_call_turns_trim_off(native):
    trim_on = small_model(trim_ratio=-1)
    input_ids, _ = batch([prompt(3, 1, 4, seed=6)])
    with pytest.raises(ValueError, match="hold image placeholder tokens but no `pixel_values` were given"):
        trim_on(input_ids=input_ids)
    with pytest.raises(ValueError, match="hold image placeholder tokens but no `pixel_values` were given"):
        trim_on.generate(input_ids=input_ids, max_new_tokens=2)
    with torch.no_grad():
        logits = trim_on(input_ids=input_ids, trim_ratio=None).logits
        expected = native(input_ids=input_ids).logits
    assert torch.equal(logits, expected)  # the same language model on the same embeddings


# ------------------------------------------------------------------------------------------------------------------
# 2. inputs_embeds with pixel_values
# ------------------------------------------------------------------------------------------------------------------


def test_inputs_embeds_with_pixel_values_trim_off_as_native(model, native, native64):
    input_ids, attention_mask = batch([prompt(3, 1, 4, seed=7), prompt(8, 1, 2, seed=8)])
    pixel_values = pixels(2, seed=7)
    with torch.no_grad():
        embeds = native.get_input_embeddings()(input_ids)
        ours = model(inputs_embeds=embeds, attention_mask=attention_mask, pixel_values=pixel_values)
        expected = native(inputs_embeds=embeds, attention_mask=attention_mask, pixel_values=pixel_values)
        exact = native64(
            inputs_embeds=embeds.double(), attention_mask=attention_mask, pixel_values=pixel_values.double()
        )
        from_ids = model(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values)
    assert_float32_close(ours.logits, expected.logits, exact.logits, where=attention_mask)
    assert torch.equal(ours.logits, from_ids.logits)


def test_inputs_embeds_with_pixel_values_trim_on_refused(native):
    trim_on = small_model(trim_ratio=-1)
    input_ids, _ = batch([prompt(3, 1, 4, seed=9)])
    trim_ids, trim_mask = questions(1)
    embeds = native.get_input_embeddings()(input_ids).detach()
    message = r"`inputs_embeds` with `pixel_values` is supported by `forward` with TRIM off only"
    with pytest.raises(ValueError, match=message):
        trim_on(inputs_embeds=embeds, pixel_values=pixels(1), trim_input_ids=trim_ids, trim_attention_mask=trim_mask)
    with pytest.raises(ValueError, match=message):
        trim_on.generate(inputs_embeds=embeds, pixel_values=pixels(1), trim_input_ids=trim_ids, max_new_tokens=2)


# ------------------------------------------------------------------------------------------------------------------
# 3. get_image_features: native's output object, plus what TRIM kept
# ------------------------------------------------------------------------------------------------------------------


def test_get_image_features_trim_off_is_natives_output(native64):
    ours_model = small_model()
    ours_model.set_attn_implementation("eager")  # attentions are recorded by the eager back-end only
    native = native_llava(ours_model)
    native.set_attn_implementation("eager")
    pixel_values = pixels(2, seed=10)
    asked = dict(output_hidden_states=True, output_attentions=True)
    with torch.no_grad():
        for options in ({}, asked):
            ours = ours_model.get_image_features(pixel_values, **options)
            theirs = native.get_image_features(pixel_values, **options)
            assert isinstance(ours, BaseModelOutputWithPooling)
            assert set(ours.keys()) - {"trim_selection"} == set(theirs.keys())
            assert torch.equal(ours.last_hidden_state, theirs.last_hidden_state)
            assert len(ours.hidden_states) == len(theirs.hidden_states)
            for mine, reference in zip(ours.hidden_states, theirs.hidden_states, strict=True):
                assert (mine is None and reference is None) or torch.equal(mine, reference)
            if options:
                assert len(ours.attentions) == len(theirs.attentions) == TINY_VISION["num_hidden_layers"]
                assert all(torch.equal(a, b) for a, b in zip(ours.attentions, theirs.attentions, strict=True))
            exact = native64.get_image_features(pixel_values.double()).pooler_output
            assert [f.shape for f in ours.pooler_output] == [f.shape for f in theirs.pooler_output] == [(S, 64)] * 2
            for mine, reference, truth in zip(ours.pooler_output, theirs.pooler_output, exact, strict=True):
                assert_float32_close(mine, reference, truth)
            assert ours.trim_selection.trim_ratio is None and ours.trim_selection.num_kept.tolist() == [S, S]
        as_tuple = ours_model.get_image_features(pixel_values, return_dict=False)
    assert isinstance(as_tuple, tuple) and torch.equal(as_tuple[0], ours.last_hidden_state)


def test_get_image_features_trim_on_says_what_was_kept(native):
    trim_on = small_model(trim_ratio=0.25)
    pixel_values = pixels(2, seed=11)
    trim_ids, trim_mask = questions(2, seed=11)
    with torch.no_grad():
        ours = trim_on.get_image_features(pixel_values, trim_input_ids=trim_ids, trim_attention_mask=trim_mask)
        theirs = native.get_image_features(pixel_values)
    assert isinstance(ours, BaseModelOutputWithPooling)
    assert torch.equal(ours.last_hidden_state, theirs.last_hidden_state)  # the vision tower's, untrimmed
    assert ours.trim_selection.num_kept.tolist() == [S // 4, S // 4]
    assert [len(f) for f in ours.pooler_output] == [S // 4 + 1] * 2  # kept tokens + the aggregate


# ------------------------------------------------------------------------------------------------------------------
# 4. A list of vision_feature_layer
# ------------------------------------------------------------------------------------------------------------------

LAYERS = [-2, -1]


@pytest.fixture(scope="module")
def layered():
    return small_model(vision_feature_layer=LAYERS)


def test_vision_feature_layer_list_trim_off_as_native(layered):
    native = native_llava(layered)
    native64 = native_llava_like(native).double()
    assert layered.model.multi_modal_projector.linear_1.in_features == 2 * TINY_VISION["hidden_size"]
    input_ids, attention_mask = batch([prompt(3, 1, 4, seed=12), prompt(7, 1, 1, seed=13)])
    inputs = dict(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixels(2, seed=12))
    with torch.no_grad():
        ours = layered(**inputs).logits
        expected = native(**inputs).logits
        exact = native64(**{**inputs, "pixel_values": inputs["pixel_values"].double()}).logits
    assert_float32_close(ours, expected, exact, where=attention_mask)


def hand_trimmed_features(native: LlavaForConditionalGeneration, pixel_values, keep_mask) -> list[torch.Tensor]:
    """docs/trim.md section 2 point 5 by hand on native Llava: each listed layer's kept patches and the mean of its
    pruned ones, concatenated over the layers, through native's projector."""
    hidden = native.model.vision_tower(pixel_values, output_hidden_states=True).hidden_states
    features = torch.cat([hidden[layer][:, 1:] for layer in LAYERS], dim=-1)  # (images, N, 2 Dv)
    tokens = [
        torch.cat([f[keep], f[~keep].mean(0, keepdim=True)]) for f, keep in zip(features, keep_mask, strict=True)
    ]
    return [native.model.multi_modal_projector(t) for t in tokens]


def test_vision_feature_layer_list_trim_on_keeps_the_same_patches_of_every_layer(layered):
    native = native_llava(layered)
    pixel_values = pixels(2, seed=14)
    trim_ids, trim_mask = questions(2, seed=14)
    with torch.no_grad():
        ours = layered.get_image_features(
            pixel_values, trim_input_ids=trim_ids, trim_attention_mask=trim_mask, trim_ratio=0.25
        )
        # the scores: on the last listed layer (docs/trim.md section 2), computed by hand from CLIP's pieces
        hidden = native.model.vision_tower(pixel_values, output_hidden_states=True).hidden_states
        scored = layered.model.vision_tower.post_layernorm(hidden[LAYERS[-1]][:, 1:])
        scorer = layered.model.trim_scorer
        text = scorer.text_projection(scorer.text_model(input_ids=trim_ids, attention_mask=trim_mask).pooler_output)
        probs = torch.softmax(-(scorer.visual_projection(scored) * text[:, None]).sum(-1), dim=-1)
        keep_mask = ours.trim_selection.keep_mask
        assert np.array_equal(keep_mask.numpy(), reference_keep(probs.double().numpy(), 0.25))
        expected = hand_trimmed_features(native, pixel_values, keep_mask)
        exact = hand_trimmed_features(native_llava_like(native).double(), pixel_values.double(), keep_mask)
        for mine, reference, truth in zip(ours.pooler_output, expected, exact, strict=True):
            assert_float32_close(mine, reference, truth)
        out = layered(
            input_ids=batch([prompt(2, 1, 3, seed=15)])[0],
            pixel_values=pixel_values[:1],
            trim_input_ids=trim_ids[:1],
            trim_ratio=0.25,
        )
    assert out.compacted_input_ids.eq(TINY_IMAGE_TOKEN_ID).sum() == S // 4 + 1


def test_vision_feature_layer_list_per_call_needs_a_matching_projector(model):
    input_ids, _ = batch([prompt(3, 1, 4, seed=16)])
    with pytest.raises(ValueError, match=r"selects 2 layer\(s\) but the projector reads 1: .* not per call"):
        model(input_ids=input_ids, pixel_values=pixels(1), vision_feature_layer=[-2, -1])


# ------------------------------------------------------------------------------------------------------------------
# 5. Weight initialisation: every parameter, as transformers initialises CLIP and Llava
# ------------------------------------------------------------------------------------------------------------------


def test_fresh_weights_are_natives_for_the_towers_and_the_language_model():
    config = tiny_config(trim_ratio=None)
    torch.manual_seed(3)
    ours = LlavaTrimForConditionalGeneration(config).state_dict()
    torch.manual_seed(3)
    theirs = LlavaForConditionalGeneration(native_llava_config(config)).state_dict()
    # drawn in the same order as native up to the projector and the LM head, which are drawn after the scorer
    later = {k for k in theirs if k.startswith(("model.multi_modal_projector.", "lm_head."))}
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs if k not in later)


def reference_clip_init(config: LlavaTrimConfig) -> dict[str, torch.Tensor]:
    """TRIM's scorer weights as transformers' own CLIP classes initialise them (text tower, CLIPModel projections)."""
    clip = CLIPModel(
        CLIPConfig(
            text_config=config.clip_text_config.to_dict(),
            vision_config=config.vision_config.to_dict(),
            projection_dim=config.projection_dim,
        )
    )
    state = {f"text_model.{k}": v for k, v in CLIPTextModel(config.clip_text_config).state_dict().items()}
    state["text_projection.weight"] = clip.text_projection.weight
    state["visual_projection.weight"] = clip.visual_projection.weight
    return state


def same_distribution(ours: torch.Tensor, reference: torch.Tensor) -> bool:
    """Constant tensors (biases, norms) equal; random ones with the same mean and std, within 6 standard errors."""
    if reference.numel() == 1 or reference.std() == 0:
        return torch.equal(ours, reference)
    n = reference.numel()
    std_error = reference.std() * (2 / (n - 1)) ** 0.5  # of a sample std, for each of the two samples
    return bool(
        (ours.std() - reference.std()).abs() <= 6 * std_error * 2**0.5
        and (ours.mean() - reference.mean()).abs() <= 6 * reference.std() * (2 / n) ** 0.5
    )


@pytest.fixture(scope="module")
def checkpoint_without_scorer(tmp_path_factory):
    folder = tmp_path_factory.mktemp("no-scorer")
    tiny_model(seed=0).save_pretrained(folder)
    state = load_file(folder / "model.safetensors")
    state = {k: v for k, v in state.items() if not k.startswith("model.trim_scorer.")}
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


@pytest.mark.parametrize(
    "load", [{}, {"low_cpu_mem_usage": True}, {"device_map": "cpu"}], ids=["default", "low-cpu-mem", "device-map"]
)
def test_missing_scorer_weights_are_initialised_as_clip(checkpoint_without_scorer, load):
    loads = []
    for _ in range(2):
        torch.manual_seed(5)
        model = LlavaTrimForConditionalGeneration.from_pretrained(checkpoint_without_scorer, **load)
        loads.append({k: v.detach().clone() for k, v in model.model.trim_scorer.state_dict().items()})
    reference = reference_clip_init(model.config)
    assert set(loads[0]) == set(reference)
    for name, value in loads[0].items():
        assert torch.isfinite(value).all(), name
        assert torch.equal(value, loads[1][name]), name  # deterministic under the seed
        assert same_distribution(value.float(), reference[name].float()), name
    saved = load_file(checkpoint_without_scorer / "model.safetensors")
    assert all(torch.equal(model.state_dict()[k], v) for k, v in saved.items())  # loaded weights untouched


# ------------------------------------------------------------------------------------------------------------------
# 6. The composite config: each sub-config round-trips under its own key
# ------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("config_class", [LlavaTrimConfig, LlavaConfig])
def test_every_sub_config_loads_on_its_own(tmp_path, config_class):
    config = tiny_config() if config_class is LlavaTrimConfig else native_llava_config(tiny_config())
    config.save_pretrained(tmp_path)
    loaded = config_class.from_pretrained(tmp_path)
    saved = config.to_dict()
    for key, sub_class in loaded.sub_configs.items():
        if sub_class.__name__ == "AutoConfig":
            sub_class = type(getattr(loaded, key))
        alone = sub_class.from_pretrained(tmp_path)
        alone_dict, expected = alone.to_dict(), dict(saved[key])
        alone_dict.pop("transformers_version", None), expected.pop("transformers_version", None)
        assert alone_dict == expected, key
        assert isinstance(alone, type(getattr(loaded, key))), key
        alone.save_pretrained(tmp_path / key)
        assert sub_class.from_pretrained(tmp_path / key).to_dict() == alone.to_dict(), key
    assert loaded.text_config.model_type == "llama"
    if config_class is LlavaTrimConfig:
        assert loaded.clip_text_config.model_type == "clip_text_model"


def test_numpy_trim_settings_are_stored_as_python_numbers(tmp_path):
    model = small_model(trim_ratio=-1)
    model.config.trim_ratio = np.float32(0.25)
    model.config.trim_iqr_multiplier = np.float64(2.0)
    assert type(model.config.trim_ratio) is float and model.config.trim_ratio == 0.25
    assert type(model.config.trim_iqr_multiplier) is float and model.config.trim_iqr_multiplier == 2.0
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["trim_ratio"] == 0.25
    loaded = LlavaTrimForConditionalGeneration.from_pretrained(tmp_path, trim_ratio=np.float32(0.5))
    assert type(loaded.config.trim_ratio) is float and loaded.config.trim_ratio == 0.5
    assert json.loads(loaded.config.to_json_string())["trim_ratio"] == 0.5
    input_ids, _ = batch([prompt(3, 1, 4, seed=17)])
    trim_ids, trim_mask = questions(1, seed=17)
    inputs = dict(input_ids=input_ids, pixel_values=pixels(1), trim_input_ids=trim_ids, trim_attention_mask=trim_mask)
    with torch.no_grad():
        assert loaded(**inputs).trim_selection.num_kept.tolist() == [S // 2]
    with pytest.raises(Exception, match="`trim_ratio` must be None"):
        model.config.trim_ratio = np.float32(1.5)
    with pytest.raises(Exception, match="trim_ratio"):
        model.config.trim_ratio = np.bool_(True)
    assert model.config.trim_ratio == 0.25


# ------------------------------------------------------------------------------------------------------------------
# 7. The generation class: GenerationMixin among its direct bases, native's generation attributes
# ------------------------------------------------------------------------------------------------------------------


def test_generation_class_declares_what_native_declares():
    ours, native = LlavaTrimForConditionalGeneration, LlavaForConditionalGeneration
    assert GenerationMixin in ours.__bases__  # transformers' `can_generate` looks for it there first
    assert ours.can_generate() and issubclass(ours, GenerationMixin)
    for name in (
        "_is_stateful",
        "_supports_flash_attn",
        "_supports_sdpa",
        "_supports_flex_attn",
        "_supports_attention_backend",
        "_can_compile_fullgraph",
        "_supported_generation_modes",
        "_tied_weights_keys",
        "_tp_plan",
        "base_model_prefix",
        "main_input_name",
        "input_modalities",
        "supports_gradient_checkpointing",
    ):
        assert getattr(ours, name, None) == getattr(native, name, None), name
    assert hasattr(ours, "_reorder_cache") == hasattr(native, "_reorder_cache")
    assert ours._supports_default_dynamic_cache() == native._supports_default_dynamic_cache()
    model = small_model()
    reference = native_llava(model)
    assert model._supports_logits_to_keep() == reference._supports_logits_to_keep()
    assert model._supports_mm_encoder_outputs() == reference._supports_mm_encoder_outputs()


# ------------------------------------------------------------------------------------------------------------------
# 8a. LlavaTrimModel: a row in a batch gives what it gives alone, on its attended positions
# ------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("trim_ratio", [-1, 0.25, None], ids=["auto", "fixed", "off"])
def test_trim_model_rows_in_a_batch_as_alone(trim_ratio):
    model = small_model(trim_ratio=trim_ratio)
    base: LlavaTrimModel = model.model
    base64 = small_model(trim_ratio=trim_ratio).double().model
    rows = [prompt(2, 1, 5, seed=20), prompt(9, 1, 1, seed=21), prompt(4, 2, 2, seed=22)]
    image_rows = [0, 1, 2, 2]  # the row of each image, in pixel_values order
    input_ids, attention_mask = batch(rows)
    pixel_values = pixels(4, seed=20)
    trim_ids, trim_mask = questions(4, seed=20)
    with torch.no_grad():
        batched = base(
            input_ids=input_ids,
            attention_mask=attention_mask,
            pixel_values=pixel_values,
            trim_input_ids=trim_ids,
            trim_attention_mask=trim_mask,
        )
        for row, tokens in enumerate(rows):
            images = [i for i, r in enumerate(image_rows) if r == row]
            alone_inputs = dict(
                input_ids=torch.tensor([tokens]),
                pixel_values=pixel_values[images],
                trim_input_ids=trim_ids[images],
                trim_attention_mask=trim_mask[images],
            )
            alone = base(**alone_inputs)
            exact = base64(**{**alone_inputs, "pixel_values": pixel_values[images].double()})
            assert torch.equal(batched.trim_selection.keep_mask[images], alone.trim_selection.keep_mask)
            assert torch.equal(exact.trim_selection.keep_mask, alone.trim_selection.keep_mask)
            attended = batched.compacted_attention_mask[row].bool()
            assert torch.equal(batched.compacted_input_ids[row][attended], alone.compacted_input_ids[0])
            assert_float32_close(
                batched.last_hidden_state[row][attended], alone.last_hidden_state[0], exact.last_hidden_state[0]
            )
