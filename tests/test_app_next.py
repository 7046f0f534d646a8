"""The Gradio page on a LLaVA-NeXT (anyres) TRIM folder: the `answer` endpoint through `gradio_client` gives the
model's own answer and count, the heatmap is the visualisation's overview-and-tiles drawing, and the page's image
limits hold (a large upload is not padded to LLaVA-1.5's square)."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_app import MAX_NEW_TOKENS, QUESTION, picture, server  # noqa: F401 (fixtures: the page on `loaded` below)

gr = pytest.importorskip("gradio")
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:gradio.queueing")

from llava_trim.testing_utils.tiny import TINY_IMAGE_TOKEN_ID  # noqa: E402
from llava_trim.testing_utils.tiny_next import build_tiny_next_processor, tiny_next_model  # noqa: E402
from llava_trim.tools import app as trim_app  # noqa: E402
from llava_trim.tools.visualize import anyres_views, draw_anyres_kept_patches  # noqa: E402


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-llava-next-trim")
    build_tiny_next_processor(folder)
    tiny_next_model(seed=0).save_pretrained(folder)
    return trim_app.load_model_and_processor(str(folder), device="cpu")


def reference(loaded, image_path: Path, trim_ratio):
    """The processor, `select_image_tokens` and `generate` called directly: (inputs, selection, answer). The answer is
    what transformers' `TextIteratorStreamer` gives for `generate`'s tokens, as the page streams it (the tiny random
    model writes byte tokens, which a streamer renders piece by piece)."""
    from transformers import TextIteratorStreamer

    model, processor = loaded
    with Image.open(image_path) as opened:
        image = opened.convert("RGB")
    messages = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": QUESTION}]}]
    inputs = processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    selection = model.select_image_tokens(**inputs, trim_ratio=trim_ratio)
    streamer = TextIteratorStreamer(processor.tokenizer, skip_prompt=True, skip_special_tokens=True)
    with torch.inference_mode():
        model.generate(
            **inputs,
            trim_ratio=trim_ratio,
            max_new_tokens=MAX_NEW_TOKENS,
            do_sample=False,
            pad_token_id=processor.tokenizer.pad_token_id,
            streamer=streamer,
        )
    return inputs, selection, "".join(streamer).strip()  # generation is over: the streamer holds every piece


@pytest.mark.parametrize(("mode", "trim_ratio"), [("auto", -1), ("0.25", 0.25), ("off", None)])
def test_answer_endpoint_on_a_next_model(server, loaded, picture, mode, trim_ratio):  # noqa: F811
    from gradio_client import Client, handle_file

    client = Client(server, verbose=False)
    text, heatmap_path, kept = client.predict(handle_file(str(picture)), QUESTION, mode, api_name="/answer")

    model, processor = loaded
    inputs, selection, answer = reference(loaded, picture, trim_ratio)
    assert inputs["pixel_values"].ndim == 5 and inputs["image_sizes"].tolist() == [[300, 400]]
    assert (kept, text) == (int(selection.num_kept[0]), answer)
    # the heatmap is visualize's LLaVA-NeXT drawing of the model's own selection, pixel for pixel
    overview, grid_view = anyres_views(model, inputs["pixel_values"][0], [300, 400], processor.image_processor)
    grid_shape = (grid_view.height // 14, grid_view.width // 14)
    expected = draw_anyres_kept_patches(
        overview,
        grid_view,
        selection.keep_mask[0],
        grid_shape,
        label=trim_app.mode_label(trim_ratio),
        question=QUESTION,
    )
    with Image.open(heatmap_path) as heatmap:
        assert np.array_equal(np.asarray(heatmap.convert("RGB")), np.asarray(expected))
    # the overview beside the unpadded grid: 400 x 300 scaled by 1.12 into the 336 x 672 pinpoint (1 x 2 tiles)
    assert overview.size == (336, 336) and grid_view.size == (448, 336)


def test_count_is_this_images_candidates(loaded, picture):  # noqa: F811
    """ "kept / candidates": the overview's 576 patches and the unpadded grid's, the newlines not counted."""
    model, processor = loaded
    chat = trim_app.TrimChat(model, processor, max_new_tokens=MAX_NEW_TOKENS)
    reply = chat.prepare([trim_app.user_turn(QUESTION, Image.open(picture).convert("RGB"))], trim_ratio=-1)
    placeholders = int((reply.inputs["input_ids"] == TINY_IMAGE_TOKEN_ID).sum())
    _, grid_view = anyres_views(model, reply.inputs["pixel_values"][0], [300, 400], processor.image_processor)
    rows = grid_view.height // 14  # one newline per grid row
    assert reply.num_patches == placeholders - rows > 576
    assert reply.kept_text == f"{reply.num_kept} / {placeholders - rows} kept"
    off_ms, off_positions = chat.prefill_ms(reply.inputs, None, repeats=1)
    trim_ms, trim_positions = chat.prefill_ms(reply.inputs, -1, repeats=1)
    assert off_ms > 0 and trim_ms > 0 and trim_positions < off_positions == reply.inputs["input_ids"].shape[1]


def test_a_large_upload_is_not_padded_to_llava_1_5s_square(loaded, tmp_path):
    """LLaVA-NeXT tiles the image itself: the page hands it over as decoded, where LLaVA-1.5's bounded canvas would
    pad it to one 336 px square (and the answer would be about another picture than the processor's)."""
    _, processor = loaded
    path = tmp_path / "wide.png"
    Image.new("RGB", (6000, 1000), (10, 120, 200)).save(path)  # its square canvas is over MAX_CANVAS_PIXELS
    assert trim_app.read_image(path, processor.image_processor).size == (6000, 1000)
    big = tmp_path / "big.png"
    Image.new("L", (8000, 8000)).save(big)  # 64 M pixels: over the processor's limit, refused from the header
    with pytest.raises(gr.Error, match="Could not open 'big.png' as an image"):
        trim_app.read_image(big, processor.image_processor)


def test_bad_input_is_reported_as_messages_on_a_next_model(server, picture, tmp_path):  # noqa: F811
    from gradio_client import Client, handle_file

    client = Client(server, verbose=False)
    not_a_picture = tmp_path / "broken.png"
    not_a_picture.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    cases = [
        ((handle_file(str(not_a_picture)), QUESTION, "auto"), "Could not open 'broken.png' as an image"),
        ((handle_file(str(picture)), "x" * (trim_app.MAX_QUESTION_CHARS + 1), "auto"), "over the page's limit"),
    ]
    for arguments, message in cases:
        with pytest.raises(Exception, match=message):
            client.predict(*arguments, api_name="/answer")
