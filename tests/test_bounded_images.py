"""Bounded work per image: the pixel limit, decompression bombs, animated images, and LLaVA's pad-then-resize of a
large canvas computed on the strip its filter reaches, against transformers' own pad-then-resize (the full canvas).

Tolerances, in levels of the 8-bit resized image (pixel values are `(level / 255 - mean) / std`):
- PIL's order of passes (any wide image, tall ones up to a strip of `MAX_CANVAS_PIXELS` plus their own pixels): the
  strip's windows are placed with PIL's `box`, whose float positions can move one fixed-point filter coefficient
  by one unit (2^-22), so one rounded 8-bit pass can move by 1 level, and the second pass carries it with the L1
  norm of the bicubic weights (1 + 2 * 1/24 * 2 = 1.17) plus its own rounding: at most 2 levels.
- The other order (very tall, thin images): each order rounds its 8-bit intermediate (0.5 level, carried by the
  1.17 norm) and its output (0.5 level), 1.08 levels from the real-valued resize, so at most 2 levels apart where
  no intermediate clips (smooth content). A bicubic pass overshoots a 0/255 step by up to 255 / 12 (its negative
  lobes hold 1/12 of its weight), which one order clips and the other may not: at most 2 + 2 * 1.17 * 21.25 = 52
  levels on content with sharp 0/255 edges at the output's pixel scale (measured: 19).
"""

import io
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image

import llava_trim.processing_llava_trim as processing
from llava_trim.processing_llava_trim import bounded_pad_and_resize, llava_image_processor, load_image
from llava_trim.testing_utils.tiny_tokenizers import build_clip_image_processor, build_tiny_processor

ORDER_TOLERANCE = 2  # levels: see the module docstring
SWAPPED_SMOOTH_TOLERANCE = 2
SWAPPED_SHARP_TOLERANCE = 52


@pytest.fixture(scope="module")
def image_processor():
    return llava_image_processor(build_clip_image_processor())


@pytest.fixture(scope="module")
def processor():
    return build_tiny_processor()


def photo(width: int, height: int, seed: int = 0) -> Image.Image:
    """Smooth gradients and waves plus noise, like a photo."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    values = np.stack([x / width * 255, y / height * 255, 128 + 60 * np.sin(x / 37) * np.cos(y / 23)], axis=-1)
    return Image.fromarray((values + rng.normal(0, 8, values.shape)).clip(0, 255).astype(np.uint8))


def sharp_blocks(width: int, height: int, seed: int = 0) -> Image.Image:
    """Random 0 / 255 blocks about one output pixel wide: the bicubic filter's worst case (overshoot, clipping)."""
    block = max(1, max(width, height) // 336)
    rng = np.random.default_rng(seed)
    cells = (rng.random((height // block + 1, width // block + 1, 3)) > 0.5).astype(np.uint8) * 255
    return Image.fromarray(cells).resize((width, height), Image.NEAREST)


def levels(image_processor, image: Image.Image) -> np.ndarray:
    """The image processor's pad-then-resize (transformers' LLaVA processor, the whole canvas), as 8-bit levels."""
    resized = image_processor(image, do_rescale=False, do_normalize=False, return_tensors="np")["pixel_values"][0]
    return resized.astype(np.int64)  # (3, 336, 336)


@pytest.mark.parametrize("size", [(6000, 30), (5000, 1500), (30, 6000), (4200, 4500)])
def test_large_canvas_matches_the_full_pad_then_resize(image_processor, size):
    width, height = size
    assert max(size) ** 2 > processing.MAX_CANVAS_PIXELS  # the canvas is not built
    for image in (photo(width, height, seed=width), sharp_blocks(width, height, seed=height)):
        bounded = bounded_pad_and_resize(image, image_processor)
        assert bounded.size == (336, 336)
        difference = np.abs(levels(image_processor, bounded) - levels(image_processor, image))
        assert difference.max() <= ORDER_TOLERANCE, (size, difference.max())


@pytest.mark.parametrize("size", [(50, 6000), (1500, 5000)])
def test_very_tall_image_resized_vertically_first_stays_within_tolerance(image_processor, monkeypatch, size):
    width, height = size
    exact = {
        kind: levels(image_processor, make(width, height))
        for kind, make in (("smooth", photo), ("sharp", sharp_blocks))
    }
    monkeypatch.setattr(processing, "MAX_CANVAS_PIXELS", -(10**12))  # no strip is affordable: the swapped order
    for kind, make in (("smooth", photo), ("sharp", sharp_blocks)):
        bounded = bounded_pad_and_resize(make(width, height), image_processor)
        difference = np.abs(levels(image_processor, bounded) - exact[kind]).max()
        assert difference <= (SWAPPED_SMOOTH_TOLERANCE if kind == "smooth" else SWAPPED_SHARP_TOLERANCE), (
            kind,
            difference,
        )


def test_ordinary_canvas_is_left_to_the_image_processor(image_processor):
    side = int(processing.MAX_CANVAS_PIXELS**0.5)
    ordinary = Image.new("RGB", (side, 8))
    assert bounded_pad_and_resize(ordinary, image_processor) is ordinary  # bit-identical: transformers' own path
    assert bounded_pad_and_resize(Image.new("RGB", (side + 1, 8)), image_processor).size == (336, 336)


def test_processor_output_is_the_pad_then_resize_of_a_large_canvas(processor, image_processor):
    image = photo(6000, 40, seed=3)
    pixel_values = processor(images=image, text="<image>\nq", return_tensors="pt")["pixel_values"][0]
    reference = image_processor(image, return_tensors="pt")["pixel_values"][0]  # the whole 6000 x 6000 canvas
    std = torch.tensor(image_processor.image_std).view(3, 1, 1)
    assert ((pixel_values - reference).abs() * std * 255).max() <= ORDER_TOLERANCE + 1e-3


def test_a_40000_x_20_image_takes_bounded_memory_and_time(tmp_path):
    """Today's full canvas would be 40000 x 40000 (4.8 GB of bytes, 20 GB and a minute measured): now a strip."""
    path = tmp_path / "wide.png"
    photo(40000, 20).save(path)
    script = textwrap.dedent(
        f"""
        import resource, time
        from PIL import Image
        from llava_trim.testing_utils.tiny_tokenizers import build_tiny_processor
        processor = build_tiny_processor()
        processor(images=Image.new("RGB", (30, 20)), text="<image>\\nq", return_tensors="pt")  # imports, caches
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB, the peak so far
        start = time.perf_counter()
        processor(images={str(path)!r}, text="<image>\\nq", return_tensors="pt")
        print(time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)
        """
    )
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=environment
    )
    assert result.returncode == 0, result.stderr[-2000:]
    seconds, grown_kib = map(float, result.stdout.split())
    assert grown_kib < 100 * 1024, grown_kib  # MiB of the image's bytes and strips, not GB
    assert seconds < 5, seconds


# ---------------------------------------------------------------------------------------------------------------------
# Limits before decoding, bombs, animations
# ---------------------------------------------------------------------------------------------------------------------


def test_over_the_pixel_limit_is_refused_from_the_header(tmp_path, monkeypatch):
    path = tmp_path / "big.png"
    Image.new("RGB", (200, 100)).save(path)
    monkeypatch.setattr(processing, "MAX_IMAGE_PIXELS", 19_999)

    def no_decoding(self, *args, **kwargs):
        raise AssertionError("the pixels were decoded")

    monkeypatch.setattr(Image.Image, "load", no_decoding)
    monkeypatch.setattr("PIL.ImageFile.ImageFile.load", no_decoding)
    for source in (str(path), path, "file://" + str(path)):
        with pytest.raises(ValueError, match=r"200x100 = 20,000 pixels, over the limit of 19,999"):
            load_image(source)
    monkeypatch.undo()
    assert load_image(path).size == (200, 100)


def test_arrays_and_pil_images_over_the_limit_are_refused(processor, monkeypatch):
    monkeypatch.setattr(processing, "MAX_IMAGE_PIXELS", 99)
    for image in (Image.new("RGB", (10, 10)), np.zeros((10, 10, 3), dtype=np.uint8)):
        with pytest.raises(ValueError, match=r"Image 0 .*over the limit of 99"):
            processor(images=image, text="<image>\nq")


def test_decompression_bomb_is_a_value_error(tmp_path, monkeypatch):
    path = tmp_path / "bomb.png"
    Image.new("RGB", (100, 100)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1_000)  # PIL's own check: an error above twice its limit
    monkeypatch.setattr(processing, "MAX_IMAGE_PIXELS", 10**9)
    with pytest.raises(ValueError, match="decompression bomb"):
        load_image(str(path))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 6_000)  # between its limit and twice: PIL only warns
    with pytest.raises(ValueError, match="(decompression bomb|over the limit)"):
        load_image(str(path))


def test_animated_image_gives_its_first_frame_without_decoding_the_others(tmp_path):
    frames = [Image.new("RGB", (40, 30), colour) for colour in ((255, 0, 0), (0, 0, 255), (0, 255, 0))]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    data = buffer.getvalue()
    second_frame = data.index(b"\x2c", data.index(b"\x2c") + 1)  # the second image descriptor
    path = tmp_path / "broken-after-first.gif"
    path.write_bytes(data[: second_frame + 4])  # frames 2 and 3 cut off: decoding them would fail
    first = np.asarray(load_image(path))
    assert first.shape == (30, 40, 3) and (first == (255, 0, 0)).all()


# ---------------------------------------------------------------------------------------------------------------------
# Path-like images and the channel layout of arrays (issue 17, item 7)
# ---------------------------------------------------------------------------------------------------------------------


def test_pathlib_path_is_a_local_path(processor, tmp_path):
    path = tmp_path / "picture.png"
    photo(50, 40).save(path)
    assert np.array_equal(np.asarray(load_image(path)), np.asarray(load_image(str(path))))
    from_path = processor(images=path, text="<image>\nq", return_tensors="pt")["pixel_values"]
    from_str = processor(images=str(path), text="<image>\nq", return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(from_path, from_str, rtol=0, atol=0)
    with pytest.raises(ValueError, match="no such file"):
        load_image(tmp_path / "missing.png")


def test_ambiguous_channel_layout_is_refused(processor):
    rgba_or_rgb = np.random.default_rng(0).integers(0, 256, (3, 7, 4), dtype=np.uint8)
    for array in (rgba_or_rgb, torch.from_numpy(rgba_or_rgb)):
        with pytest.raises(ValueError, match=r"shape \(3, 7, 4\) could be \(C, H, W\) or \(H, W, C\)"):
            processor(images=array, text="<image>\nq")


def test_unambiguous_layouts_follow_transformers_inference():
    from transformers.image_utils import ChannelDimension, infer_channel_dimension_format

    hwc = np.random.default_rng(1).integers(0, 256, (7, 9, 3), dtype=np.uint8)
    chw = np.ascontiguousarray(hwc.transpose(2, 0, 1))  # (3, 7, 9)
    assert infer_channel_dimension_format(chw, num_channels=(1, 3, 4)) == ChannelDimension.FIRST
    assert infer_channel_dimension_format(hwc, num_channels=(1, 3, 4)) == ChannelDimension.LAST
    for array in (hwc, chw, torch.from_numpy(chw)):
        assert np.array_equal(np.asarray(load_image(array)), hwc)


# ---------------------------------------------------------------------------------------------------------------------
# The tools that read images: evaluation, fine-tuning data, visualisation
# ---------------------------------------------------------------------------------------------------------------------


def test_evaluation_names_the_question_of_an_over_limit_image_or_a_bomb(model_dir, tmp_path, monkeypatch, capsys):
    from llava_trim.tools.evaluate import main

    Image.new("RGB", (200, 100)).save(tmp_path / "big.png")
    questions = tmp_path / "q.jsonl"
    questions.write_text('{"question_id": 8, "image": "big.png", "text": "Hi?"}\n', encoding="utf-8")
    args = ["--model", str(model_dir), "--questions", str(questions), "--image-folder", str(tmp_path)]
    args += ["--settings", "auto", "--no-progress", "--no-plot"]

    def error_of(output: str) -> str:  # the run ends incomplete; the question's record holds the reason
        assert main([*args, "--output-dir", str(tmp_path / output)]) == 1
        assert "1 answers could not be given (question_id 8)" in capsys.readouterr().err
        (record,) = (json.loads(line) for line in (tmp_path / output / "answers_auto.jsonl").read_text().splitlines())
        return record["error"]

    monkeypatch.setattr(processing, "MAX_IMAGE_PIXELS", 19_999)
    error = error_of("limit")
    assert "question_id 8" in error and "over the limit of 19,999" in error
    monkeypatch.setattr(processing, "MAX_IMAGE_PIXELS", 10**9)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 5_000)  # PIL's own decompression-bomb error: 20,000 > 2 x 5,000
    error = error_of("bomb")  # a message, not a traceback
    assert "question_id 8" in error and "decompression bomb" in error


def test_fine_tuning_skips_and_counts_an_over_limit_image(tmp_path, monkeypatch):
    from llava_trim.tools.training_data import BadSampleError, LlavaConversationDataset

    Image.new("RGB", (200, 100)).save(tmp_path / "big.png")
    Image.new("RGB", (20, 10)).save(tmp_path / "small.png")
    conversations = [{"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "Black."}]
    records = [{"id": name, "image": f"{name}.png", "conversations": conversations} for name in ("small", "big")]
    (tmp_path / "data.json").write_text(json.dumps(records))
    monkeypatch.setattr(processing, "MAX_IMAGE_PIXELS", 19_999)
    with pytest.raises(BadSampleError, match="over the limit of 19,999"):
        LlavaConversationDataset(tmp_path / "data.json", tmp_path)[1]
    lenient = LlavaConversationDataset(tmp_path / "data.json", tmp_path, skip_bad_samples=True)
    assert not lenient[0].get("skip_reason") and "over the limit" in lenient[1]["skip_reason"]


def test_visualisation_view_of_a_40000_x_20_image_is_bounded(image_processor):
    from llava_trim.tools.visualize import model_view, pixel_values_to_image

    image = photo(40000, 20)
    view = model_view(image, image_processor)
    expected = image_processor(bounded_pad_and_resize(image, image_processor), return_tensors="pt")["pixel_values"]
    assert np.array_equal(np.asarray(view), np.asarray(pixel_values_to_image(expected[0])))
