"""The Gradio page (`tools/app.py`): driven in headless Chromium, called through `gradio_client`, and its parts.

The page runs on a free local port with the tiny random model; nothing leaves the machine. Set
`LLAVA_TRIM_APP_SCREENSHOT=docs/images/app.png` to also write the browser test's screenshot there (the README's
picture).
"""

import os
import shutil
import socket
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

gr = pytest.importorskip("gradio")
# Gradio's queue calls pandas APIs that pandas 3 deprecates; not this project's to fix
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:gradio.queueing")

from llava_trim.configuration_llava_trim import parse_trim_ratio  # noqa: E402
from llava_trim.tools import app as trim_app  # noqa: E402
from llava_trim.tools.visualize import draw_kept_patches, pixel_values_to_image  # noqa: E402

QUESTION = "What is the colour of the ball?"
MAX_NEW_TOKENS = 8
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--window-size=1400,1100",
]


def drawn_picture(path: Path) -> Path:
    """A 400 x 300 PNG: a red ball on grass under a blue sky."""
    image = Image.new("RGB", (400, 300), (120, 180, 235))
    draw = ImageDraw.Draw(image)
    draw.rectangle((0, 200, 400, 300), fill=(60, 160, 60))
    draw.ellipse((150, 120, 250, 220), fill=(220, 30, 30))
    image.save(path)
    return path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def loaded(model_dir):
    return trim_app.load_model_and_processor(str(model_dir), device="cpu")


@pytest.fixture(scope="module")
def server(loaded, tmp_path_factory):
    """The app on the tiny model at http://127.0.0.1:<free port>/, shut down after the module."""
    model, processor = loaded
    chat = trim_app.TrimChat(model, processor, max_new_tokens=MAX_NEW_TOKENS)
    demo = trim_app.build_app(chat, examples_folder=tmp_path_factory.mktemp("examples"))
    port = free_port()
    trim_app.launch(demo, "127.0.0.1", port, block=False)
    yield f"http://127.0.0.1:{port}/"
    demo.close()


@pytest.fixture(scope="module")
def picture(tmp_path_factory) -> Path:
    return drawn_picture(tmp_path_factory.mktemp("pictures") / "ball.png")


def reference(loaded, image_path: Path, question: str, trim_ratio) -> tuple[int, str]:
    """Kept count from `model.select_image_tokens` and the greedy answer from `model.generate`, called directly."""
    model, processor = loaded
    with Image.open(image_path) as opened:
        image = opened.convert("RGB")
    messages = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": question}]}]
    inputs = processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    num_kept = int(model.select_image_tokens(**inputs, trim_ratio=trim_ratio).num_kept[0])
    with torch.inference_mode():
        out = model.generate(
            **inputs,
            trim_ratio=trim_ratio,
            max_new_tokens=MAX_NEW_TOKENS,
            do_sample=False,
            pad_token_id=processor.tokenizer.pad_token_id,
        )
    answer = processor.tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    return num_kept, answer.strip()


# ---------------------------------------------------------------------------------------------------------------------
# Parts
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mode", "trim_ratio"), [("auto", -1), ("AUTO", -1), ("-1", -1), ("off", None), ("0.25", 0.25), ("1", 1.0)]
)
def test_parse_mode(mode, trim_ratio):
    assert parse_trim_ratio(mode) == trim_ratio


@pytest.mark.parametrize("mode", ["0", "1.5", "-0.5", "half", "", "nan"])
def test_parse_mode_refuses_with_the_accepted_forms(mode):
    with pytest.raises(ValueError, match="use 'auto' \\(or -1\\), 'off' \\(or none\\) or a keep ratio"):
        parse_trim_ratio(mode)


def test_mode_from_controls():
    assert trim_app.mode_from_controls(trim_app.MODE_AUTO, 0.3) == "auto"
    assert trim_app.mode_from_controls(trim_app.MODE_OFF, 0.3) == "off"
    assert trim_app.mode_from_controls(trim_app.MODE_RATIO, 0.3) == "0.3"


def test_image_question_is_the_turn_that_carries_the_image(picture):
    image = Image.open(picture)
    messages = [
        trim_app.user_turn("What is this?", image),
        {"role": "assistant", "content": [{"type": "text", "text": "A ball."}]},
        trim_app.user_turn("And its colour?", None),
    ]
    assert trim_app.image_question(messages) == "What is this?"
    # an image turn without text: the next user turn that has text
    messages[0] = {"role": "user", "content": [{"type": "image", "image": image}]}
    assert trim_app.image_question(messages) == "And its colour?"


def test_read_image_refuses_a_file_that_is_not_a_picture(tmp_path):
    not_a_picture = tmp_path / "notes.png"
    not_a_picture.write_text("hello")
    with pytest.raises(gr.Error, match="Could not open 'notes.png' as an image.*Upload a PNG"):
        trim_app.read_image(not_a_picture)
    with pytest.raises(gr.Error, match="Upload an image"):
        trim_app.read_image(None)


def two_turn_chat(loaded, picture):
    model, processor = loaded
    chat = trim_app.TrimChat(model, processor, max_new_tokens=MAX_NEW_TOKENS)
    first = [trim_app.user_turn(QUESTION, Image.open(picture))]
    reply = chat.prepare(first, trim_ratio=-1)
    answer = list(chat.stream(reply))[-1]
    follow_up = first + [
        {"role": "assistant", "content": [{"type": "text", "text": answer}]},
        trim_app.user_turn("Is it round?", None),
    ]
    return chat, reply, answer, follow_up, chat.prepare(follow_up, trim_ratio=-1)


def test_chat_keeps_history(loaded, picture):
    """The streamed answer is `generate`'s; the follow-up prompt holds the whole chat; counts are the model's."""
    model, _ = loaded
    chat, reply, answer, follow_up, second = two_turn_chat(loaded, picture)
    assert (reply.num_kept, answer.strip()) == reference(loaded, picture, QUESTION, -1)
    assert reply.kept_text == f"{reply.num_kept} / 576 kept"
    assert second.inputs["input_ids"].shape[1] > reply.inputs["input_ids"].shape[1]
    assert second.inputs["pixel_values"].shape[0] == 1  # the image is in the chat once
    assert second.num_kept == int(model.select_image_tokens(**second.inputs, trim_ratio=-1).num_kept[0])
    prompt = chat.processor.tokenizer.decode(second.inputs["input_ids"][0])
    assert QUESTION in prompt and "Is it round?" in prompt and answer.strip() in prompt


def test_follow_up_keeps_the_image_selection(loaded, picture):
    """A follow-up question reuses the image's question (the turn that carries it): same selection, same heatmap."""
    _, reply, _, follow_up, second = two_turn_chat(loaded, picture)
    assert trim_app.image_question(follow_up) == QUESTION
    assert torch.equal(second.inputs["trim_input_ids"], reply.inputs["trim_input_ids"])
    assert second.num_kept == reply.num_kept


def test_prefill_is_measured_for_both_modes(loaded, picture):
    model, processor = loaded
    chat = trim_app.TrimChat(model, processor)
    reply = chat.prepare([trim_app.user_turn(QUESTION, Image.open(picture))], trim_ratio=0.25)
    trim_ms, trim_positions = chat.prefill_ms(reply.inputs, 0.25, repeats=1)
    off_ms, off_positions = chat.prefill_ms(reply.inputs, None, repeats=1)
    assert trim_ms > 0 and off_ms > 0
    # 576 image placeholders become floor(576 * 0.25) kept + 1 aggregate positions
    assert off_positions == reply.inputs["input_ids"].shape[1]
    assert off_positions - trim_positions == 576 - (144 + 1)


# ---------------------------------------------------------------------------------------------------------------------
# The `answer` endpoint through gradio_client
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("mode", "trim_ratio"), [("auto", -1), ("0.25", 0.25), ("off", None)])
def test_answer_endpoint_through_gradio_client(server, loaded, picture, mode, trim_ratio):
    from gradio_client import Client, handle_file

    client = Client(server, verbose=False)
    text, heatmap_path, kept = client.predict(handle_file(str(picture)), QUESTION, mode, api_name="/answer")

    expected_kept, expected_answer = reference(loaded, picture, QUESTION, trim_ratio)
    assert kept == expected_kept
    assert text == expected_answer
    # the heatmap is draw_kept_patches of the model's own selection, pixel for pixel
    model, processor = loaded
    messages = [trim_app.user_turn(QUESTION, Image.open(picture).convert("RGB"))]
    inputs = processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    selection = model.select_image_tokens(**inputs, trim_ratio=trim_ratio)
    view = pixel_values_to_image(inputs["pixel_values"][0])
    expected = draw_kept_patches(
        view, selection.keep_mask[0], question=QUESTION, label=trim_app.mode_label(trim_ratio)
    )
    with Image.open(heatmap_path) as heatmap:
        assert heatmap.width == 672  # the 336-pixel view, twice enlarged, the caption below
        assert np.array_equal(np.asarray(heatmap.convert("RGB")), np.asarray(expected))


def test_concurrent_requests_queue_and_all_get_their_answer(server, loaded, picture):
    """Gradio's queue runs one request on the model at a time; each caller still gets its own result."""
    from gradio_client import Client, handle_file

    modes = ["auto", "0.25", "off", "0.5"]
    jobs = [
        Client(server, verbose=False).submit(handle_file(str(picture)), QUESTION, mode, api_name="/answer")
        for mode in modes
    ]
    for mode, job in zip(modes, jobs, strict=True):
        text, _, kept = job.result(timeout=120)
        assert (kept, text) == reference(loaded, picture, QUESTION, parse_trim_ratio(mode))


def test_answer_endpoint_reports_bad_input_as_messages(server, picture, tmp_path):
    from gradio_client import Client, handle_file

    client = Client(server, verbose=False)
    not_a_picture = tmp_path / "broken.png"
    not_a_picture.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    cases = [
        ((handle_file(str(not_a_picture)), QUESTION, "auto"), "Could not open 'broken.png' as an image"),
        ((handle_file(str(picture)), "   ", "auto"), "The question is empty"),
        ((handle_file(str(picture)), QUESTION, "1.5"), "'1.5' is not a trim_ratio"),
    ]
    for arguments, message in cases:
        with pytest.raises(Exception, match=message):
            client.predict(*arguments, api_name="/answer")


# ---------------------------------------------------------------------------------------------------------------------
# The page in a real headless browser
# ---------------------------------------------------------------------------------------------------------------------


def chromium_driver():
    webdriver = pytest.importorskip("selenium.webdriver")
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver_path = shutil.which("chromedriver")
    if browser is None or driver_path is None:
        pytest.skip("Chromium and its driver are not installed (Debian: apt-get install chromium chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    return options


def test_page_in_headless_chromium(server, loaded, picture, tmp_path):
    """Drive the page as a person would: mistakes first, then a picture, a question, a follow-up and the timing.

    The streamed answers are `generate`'s, the kept counts are `model.select_image_tokens`'s, the heatmap renders,
    and every mistake shows as a message in the page.
    """
    options = chromium_driver()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    options.add_argument(f"--user-data-dir={tmp_path / 'chromium-profile'}")
    driver = webdriver.Chrome(options=options, service=Service(executable_path=shutil.which("chromedriver")))
    wait = WebDriverWait(driver, 60)

    def css(selector):
        return driver.find_element(By.CSS_SELECTOR, selector)

    def messages_shown(d):
        return [element.text for element in d.find_elements(By.CSS_SELECTOR, "[data-testid='toast-text']")]

    def close_messages():
        for button in driver.find_elements(By.CSS_SELECTOR, "[data-testid='toast-close']"):
            button.click()
        wait.until(lambda d: not messages_shown(d))

    def kept_text(d):
        return d.find_element(By.CSS_SELECTOR, "#kept-count textarea, #kept-count input").get_attribute("value")

    def answers(d):
        return [" ".join(bot.text.split()) for bot in d.find_elements(By.CSS_SELECTOR, "#chat .bot")]

    def ask(text):
        box = css("#question textarea")
        box.clear()
        box.send_keys(text)
        css("#ask").click()

    try:
        driver.get(server)
        upload = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#image input[type=file]"))

        # mistakes: each one a message in the page, nothing else changes
        css("#measure").click()
        wait.until(lambda d: any("Ask a question first" in text for text in messages_shown(d)))
        css("#ask").click()
        wait.until(lambda d: any("Type a question about the image first" in text for text in messages_shown(d)))
        not_a_picture = tmp_path / "broken.png"
        not_a_picture.write_bytes(b"\x89PNG\r\n\x1a\n not really")
        upload.send_keys(str(not_a_picture))
        ask(QUESTION)
        wait.until(lambda d: any("Could not open 'broken.png' as an image" in text for text in messages_shown(d)))
        assert not answers(driver) and not kept_text(driver)
        close_messages()
        css("#image button[aria-label='Remove Image']").click()

        # a drawn picture and a question: the answer streams in, the heatmap and the count appear
        wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#image input[type=file]")).send_keys(str(picture))
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#image img"))
        ask(QUESTION)
        expected_kept, expected_answer = reference(loaded, picture, QUESTION, -1)
        wait.until(lambda d: answers(d) == [" ".join(expected_answer.split())])
        wait.until(lambda d: kept_text(d) == f"{expected_kept} / 576 kept")
        heatmap = css("#heatmap img")
        wait.until(lambda d: d.execute_script("return arguments[0].complete && arguments[0].naturalWidth", heatmap))
        assert driver.execute_script("return arguments[0].naturalWidth", heatmap) == 672
        assert heatmap.size["width"] > 100 and heatmap.size["height"] > 100
        assert QUESTION in css("#chat").text

        # a follow-up with a keep ratio of 0.5 typed into the slider (which picks "Keep ratio"): TRIM keeps 288
        ratio_box = css("#ratio input[type=number]")
        ratio_box.clear()
        ratio_box.send_keys("0.5", Keys.TAB)
        wait.until(lambda d: "selected" in css("#mode [data-testid='Keep ratio-radio-label']").get_attribute("class"))
        ask("Is it round?")
        wait.until(lambda d: len(answers(d)) == 2 and kept_text(d) == "288 / 576 kept")

        # the prefill time, measured on request, for the chosen mode and for TRIM off
        css("#measure").click()
        wait.until(lambda d: "TRIM off" in d.find_element(By.CSS_SELECTOR, "#prefill").text)
        prefill = css("#prefill").text
        assert "TRIM 50%" in prefill and "ms" in prefill
        assert not messages_shown(driver)
        assert "Traceback" not in css("body").text

        time.sleep(0.5)  # let the last update settle before the picture
        screenshot = tmp_path / "app.png"
        assert driver.save_screenshot(str(screenshot))
        with Image.open(screenshot) as shot:
            assert shot.width > 1000
        if os.environ.get("LLAVA_TRIM_APP_SCREENSHOT"):
            target = Path(os.environ["LLAVA_TRIM_APP_SCREENSHOT"])
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(screenshot, target)
    finally:
        driver.quit()


def test_command_line_refuses_a_model_it_cannot_load(tmp_path):
    with pytest.raises(SystemExit, match="could not load a converted LLaVA-TRIM model"):
        trim_app.main(["--model", str(tmp_path / "missing")])
    for too_many in ("0", str(trim_app.MAX_NEW_TOKENS + 1)):
        with pytest.raises(SystemExit, match=f"--max-new-tokens must be between 1 and {trim_app.MAX_NEW_TOKENS}"):
            trim_app.main(["--model", str(tmp_path), "--max-new-tokens", too_many])
