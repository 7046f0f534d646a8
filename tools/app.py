# Copyright 2026 The llava-trim authors. Licensed under the Apache License, Version 2.0.
"""A Gradio page for a converted LLaVA-TRIM model: ask about a picture, see what TRIM keeps and what it saves.

```bash
pip install "llava-trim[app]"
python -m llava_trim.tools.app --model path/or/hub-id/of/a/converted/llava-trim   # http://127.0.0.1:7860
```

The page: upload an image (or pick an example), ask a question, choose the TRIM mode (automatic, a keep ratio, off).
The answer streams token by token into a chat that keeps its history (each image is scored against the question of
the user turn that carries it, so follow-up questions reuse its selection). Beside it: the image as the model sees it
with the kept patches outlined, the count ("121 / 576 kept"), and on request the prefill time with TRIM against TRIM
off on the same prompt. The model is loaded once; requests queue (one runs on the model at a time).

The same app answers programmatically through the endpoint `answer` (image, question, mode `"auto"`, `"off"` or a
keep ratio such as `"0.25"` -> answer text, heatmap image, number of kept patches):

```python
from gradio_client import Client, handle_file

client = Client("http://127.0.0.1:7860")
text, heatmap_path, kept = client.predict(handle_file("bus.jpg"), "What is the colour of the bus?", "auto",
                                          api_name="/answer")
```
"""

import argparse
import os
import queue
import statistics
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import gradio as gr
import torch
from PIL import Image

from ..configuration_llava_trim import parse_trim_ratio
from ..processing_llava_trim import MAX_IMAGE_PIXELS, bounded_pad_and_resize, load_image
from .cli import command_parser
from .loading import load_model_and_processor
from .visualize import anyres_views, draw_anyres_kept_patches, draw_kept_patches, pixel_values_to_image

# What the page offers in its TRIM control, and the `trim_ratio` each stands for (the ratio comes from the slider).
MODE_AUTO = "Automatic"
MODE_RATIO = "Keep ratio"
MODE_OFF = "Off"
PREFILL_REPEATS = 3

# The page's limits (README, "The Gradio page"). Each is refused with a message on the page, and with an error through
# the `answer` endpoint; images over `MAX_IMAGE_PIXELS` (the processor's) are refused from their header.
MAX_UPLOAD_BYTES = 32 * 1024 * 1024  # Gradio refuses a larger upload before it is stored
MAX_QUESTION_CHARS = 2000  # about 500 tokens: a question, not a document
MAX_TURNS = 20  # questions in one conversation (its one image, each answer and each question stay in the prompt)
MAX_NEW_TOKENS = 1024  # the most `--max-new-tokens` may be
ANSWER_SECONDS = 120.0  # generation stops after this long (transformers' `max_time`); the answer so far is returned
MAX_QUEUE = 16  # requests waiting for the model (one runs at a time); Gradio refuses more with "queue is full"


# ---------------------------------------------------------------------------------------------------------------------
# TRIM modes
# ---------------------------------------------------------------------------------------------------------------------


def mode_from_controls(choice: str, ratio: float) -> str:
    """The mode string for the page's radio choice and slider value."""
    if choice == MODE_OFF:
        return "off"
    if choice == MODE_RATIO:
        return f"{ratio:g}"
    return "auto"


def mode_label(trim_ratio: float | None) -> str:
    """A short name for a `trim_ratio`: "TRIM off", "TRIM auto" or "TRIM 25%"."""
    if trim_ratio is None:
        return "TRIM off"
    if trim_ratio == -1:
        return "TRIM auto"
    return f"TRIM {trim_ratio * 100:g}%"


# ---------------------------------------------------------------------------------------------------------------------
# The model side: prompts, selection, streaming, prefill timing
# ---------------------------------------------------------------------------------------------------------------------


def read_image(path: str | Path | None, image_processor=None) -> Image.Image:
    """
    Decode an uploaded image as the processor does ([`load_image`]: its pixel limit from the header, the first frame
    of an animation), or raise `gr.Error` with a message for the page. With LLaVA-1.5's `image_processor`, an image
    whose square canvas is large comes back already padded and resized ([`bounded_pad_and_resize`]), whatever
    processor code the model's folder carries; LLaVA-NeXT's tiles the image at one of its pinpoints (at most
    1008 px a side) without a square canvas, so the image comes back as decoded.
    """
    if path is None:
        raise gr.Error("Upload an image (or pick an example) first.")
    try:
        image = load_image(Path(path))
    except ValueError as error:
        raise gr.Error(
            f"Could not open '{Path(path).name}' as an image: {error} Upload a PNG, JPEG, WebP or GIF picture of at "
            f"most {MAX_IMAGE_PIXELS:,} pixels."
        ) from None
    if image_processor is None or tiles_images(image_processor):
        return image
    return bounded_pad_and_resize(image, image_processor)


def tiles_images(image_processor) -> bool:
    """Whether `image_processor` is LLaVA-NeXT's (anyres tiles) rather than LLaVA-1.5's (one padded square)."""
    return type(image_processor).__name__.startswith("LlavaNextImageProcessor")


def check_turns(messages: Sequence[dict]) -> None:
    """`gr.Error` when the conversation already holds `MAX_TURNS` questions."""
    if sum(message["role"] == "user" for message in messages) >= MAX_TURNS:
        raise gr.Error(
            f"This conversation has reached the page's limit of {MAX_TURNS} questions: press 'New conversation' to "
            "go on."
        )


def check_question(question: str | None) -> str:
    """The question without surrounding spaces; `gr.Error` when it is empty or over `MAX_QUESTION_CHARS`."""
    question = (question or "").strip()
    if not question:
        raise gr.Error("The question is empty: type a question about the image.")
    if len(question) > MAX_QUESTION_CHARS:
        raise gr.Error(
            f"The question is {len(question):,} characters long, over the page's limit of {MAX_QUESTION_CHARS:,}: "
            "shorten it."
        )
    return question


def user_turn(question: str, image: Image.Image | None) -> dict:
    """One user message of the chat template, with the image first when the turn carries one."""
    content = [{"type": "image", "image": image}] if image is not None else []
    content.append({"type": "text", "text": question})
    return {"role": "user", "content": content}


def image_question(messages: Sequence[dict]) -> str:
    """The question TRIM scores the first image against: the text of the user turn that carries it, or the next."""
    seen_image = False
    for message in messages:
        if message["role"] != "user":
            continue
        seen_image = seen_image or any(part["type"] == "image" for part in message["content"])
        text = " ".join(part["text"] for part in message["content"] if part["type"] == "text").strip()
        if seen_image and text:
            return text
    return ""


@dataclass
class Reply:
    """What one question produces before the answer streams: the prompt tensors, the selection and its picture."""

    inputs: dict
    trim_ratio: float | None
    num_kept: int
    num_patches: int
    heatmap: Image.Image

    @property
    def kept_text(self) -> str:
        return f"{self.num_kept} / {self.num_patches} kept"


class TrimChat:
    """The loaded model and processor, and what the page asks of them. Thread-safe: no call changes the model."""

    def __init__(self, model, processor, max_new_tokens: int = 256):
        self.model = model
        self.processor = processor
        self.max_new_tokens = max_new_tokens

    def prepare(self, messages: Sequence[dict], trim_ratio: float | None) -> Reply:
        """Template and tokenise the chat, run TRIM's selection (no language model) and draw the kept patches."""
        inputs = self.processor.apply_chat_template(
            list(messages), add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
        ).to(self.model.device)
        selection = self.model.select_image_tokens(**inputs, trim_ratio=trim_ratio)
        image_processor = self.processor.image_processor
        keep_mask = selection.keep_mask[0].cpu()  # (num_patches,) of the conversation's image
        question, label = image_question(messages), mode_label(trim_ratio)
        if inputs["pixel_values"].ndim == 5:  # LLaVA-NeXT: the overview beside the unpadded tile grid
            overview, grid_view = anyres_views(
                self.model, inputs["pixel_values"][0].cpu(), inputs["image_sizes"][0].tolist(), image_processor
            )
            patch = self.model.config.vision_config.patch_size
            grid_shape = (grid_view.height // patch, grid_view.width // patch)
            heatmap = draw_anyres_kept_patches(
                overview, grid_view, keep_mask, grid_shape, label=label, question=question, patch_size=patch
            )
        else:
            view = pixel_values_to_image(
                inputs["pixel_values"][0], image_processor.image_mean, image_processor.image_std
            )
            heatmap = draw_kept_patches(view, keep_mask, question=question, label=label)
        num_patches = int(selection.candidates_per_image[0])  # LLaVA-NeXT: this image's own candidates
        return Reply(dict(inputs), trim_ratio, int(keep_mask.sum()), num_patches, heatmap)

    def stream(self, reply: Reply) -> Iterator[str]:
        """The answer so far, growing token by token (greedy decoding in a background thread)."""
        from transformers import TextIteratorStreamer

        tokenizer = self.processor.tokenizer
        # a token at least every `ANSWER_SECONDS` (generation itself stops after that long): never a hung request
        streamer = TextIteratorStreamer(
            tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=ANSWER_SECONDS + 60
        )
        failure: list[BaseException] = []

        def generate() -> None:
            try:
                with torch.inference_mode():
                    self.model.generate(
                        **reply.inputs,
                        trim_ratio=reply.trim_ratio,
                        max_new_tokens=self.max_new_tokens,
                        max_time=ANSWER_SECONDS,
                        do_sample=False,
                        pad_token_id=tokenizer.pad_token_id,
                        streamer=streamer,
                    )
            except BaseException as error:  # reported to the page below, not lost in the thread
                failure.append(error)
                streamer.end()

        thread = threading.Thread(target=generate, daemon=True)
        thread.start()
        text = ""
        try:
            for piece in streamer:
                text += piece
                yield text
        except queue.Empty:
            raise gr.Error(f"No answer within {ANSWER_SECONDS + 60:g} seconds: try again later.") from None
        thread.join()
        if failure:
            raise gr.Error(f"Generation failed: {failure[0]}")

    def prefill_ms(self, inputs: dict, trim_ratio: float | None, repeats: int = PREFILL_REPEATS) -> tuple[float, int]:
        """Median time of one prefill (vision tower, TRIM, language model on the prompt) and its LLM positions."""
        times = []
        with torch.inference_mode():
            for _ in range(repeats + 1):  # the first run warms up
                if self.model.device.type == "cuda":
                    torch.cuda.synchronize()
                start = time.perf_counter()
                output = self.model(**inputs, trim_ratio=trim_ratio, logits_to_keep=1)
                if self.model.device.type == "cuda":
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - start)
        positions = output.compacted_input_ids.shape[1] if output.compacted_input_ids is not None else 0
        return statistics.median(times[1:]) * 1000, positions


# ---------------------------------------------------------------------------------------------------------------------
# The page
# ---------------------------------------------------------------------------------------------------------------------


def uploaded_path(payload) -> str | None:
    """The server-side file of an image input left unprocessed (events with `preprocess=False`), or `None`.

    The page reads uploads itself (`read_image`) so that a file that is not a picture becomes a message, where Gradio's
    own preprocessing would fail without one.
    """
    if payload is None:
        return None
    if isinstance(payload, dict):
        return payload.get("path")
    return getattr(payload, "path", None)


def draw_examples(folder: Path) -> list[list[str]]:
    """Example pictures drawn with PIL into `folder` (nothing downloaded), each with a question."""
    from PIL import ImageDraw

    from .demo import draw_scene

    folder.mkdir(parents=True, exist_ok=True)
    bus = folder / "bus.png"
    draw_scene().save(bus)

    shapes = Image.new("RGB", (480, 360), (245, 240, 230))
    draw = ImageDraw.Draw(shapes)
    draw.ellipse((40, 60, 200, 220), fill=(220, 40, 40))
    draw.rectangle((260, 80, 420, 240), fill=(40, 80, 220))
    draw.polygon([(150, 330), (240, 200), (330, 330)], fill=(40, 170, 60))
    shapes_path = folder / "shapes.png"
    shapes.save(shapes_path)
    return [[str(bus), "What is the colour of the bus?"], [str(shapes_path), "How many shapes are there?"]]


def chat_display(messages: Sequence[dict]) -> list[dict]:
    """The chat-template messages as the chatbot shows them (text only; the image stays in the image box)."""
    shown = []
    for message in messages:
        text = " ".join(part["text"] for part in message["content"] if part["type"] == "text")
        shown.append({"role": message["role"], "content": text})
    return shown


# The page's introduction, for LLaVA-1.5 (False) and LLaVA-NeXT (True)
INTRODUCTION = {
    False: "LLaVA-1.5 with **TRIM**: the image's 576 patch tokens are scored by CLIP against your question and only "
    "the outliers (plus one token averaging the rest) reach the language model. Ask about a picture and see which "
    "patches it kept.",
    True: "LLaVA-NeXT with **TRIM**: the patch tokens of the image's overview and of its tiles at a higher resolution "
    "(up to 2,880) are scored by CLIP against your question and only the outliers (plus one token averaging the rest) "
    "reach the language model. Ask about a picture and see which patches it kept, on the overview (left) and the "
    "tiles (right).",
}

# System fonts only: the default theme would fetch web fonts, which an offline machine cannot.
THEME = gr.themes.Soft(font=["ui-sans-serif", "system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"])
CSS = """
#kept-count textarea, #kept-count input { font-size: 1.3rem; font-weight: 600; }
"""


def build_app(chat: TrimChat, title: str = "LLaVA-TRIM", examples_folder: Path | None = None) -> gr.Blocks:
    """The Gradio page and its `answer` endpoint, on an already loaded model."""
    examples_folder = examples_folder or Path(tempfile.mkdtemp(prefix="llava-trim-app-examples-"))

    def start_turn(image_upload, question, choice, ratio, messages, conversation_image):
        """The chat with the new question, and its prepared reply; `gr.Error` for what the user must fix."""
        image_path = uploaded_path(image_upload)
        if not (question or "").strip():
            raise gr.Error("Type a question about the image first.")
        question = check_question(question)
        if image_path is None:
            raise gr.Error("Upload an image (or pick an example) first.")
        trim_ratio = parse_trim_ratio(mode_from_controls(choice, ratio))
        new_image = image_path != conversation_image or not messages
        if not new_image:
            check_turns(messages)
        image = read_image(image_path, chat.processor.image_processor) if new_image else None
        history = [] if new_image else list(messages)
        history.append(user_turn(question, image))
        try:
            return image_path, history, chat.prepare(history, trim_ratio)
        except ValueError as error:  # e.g. a prompt longer than the model accepts
            raise gr.Error(str(error)) from None

    def respond(image_upload, question, choice, ratio, messages, conversation_image):
        """One chat turn: select, draw, then stream the answer. A new image starts a new conversation."""
        try:
            image_path, history, reply = start_turn(
                image_upload, question, choice, ratio, messages, conversation_image
            )
        except gr.Error as error:  # a message in the page; the chat and the outputs stay as they were
            gr.Warning(error.message)
            yield (gr.skip(),) * 6
            return

        answer = ""
        shown = chat_display(history)
        yield shown + [{"role": "assistant", "content": ""}], messages, image_path, reply.heatmap, reply.kept_text, ""
        for answer in chat.stream(reply):
            yield shown + [{"role": "assistant", "content": answer}], gr.skip(), gr.skip(), gr.skip(), gr.skip(), ""
        history.append({"role": "assistant", "content": [{"type": "text", "text": answer.strip()}]})
        yield chat_display(history), history, image_path, gr.skip(), gr.skip(), ""

    def measure_prefill(choice, ratio, messages):
        """Prefill time of the last question's prompt with the chosen TRIM mode and with TRIM off."""
        prompt = list(messages)
        while prompt and prompt[-1]["role"] != "user":
            prompt.pop()
        if not prompt:
            gr.Warning("Ask a question first: the prefill is timed on its prompt.")
            return gr.skip()
        trim_ratio = parse_trim_ratio(mode_from_controls(choice, ratio))
        inputs = chat.prepare(prompt, trim_ratio).inputs
        device = chat.model.device.type
        off_ms, off_positions = chat.prefill_ms(inputs, None)
        header = f"Prefill of the last question's prompt, median of {PREFILL_REPEATS} runs on {device}:"
        if trim_ratio is None:
            return (
                f"{header}\n\n- TRIM off: **{off_ms:.1f} ms** ({off_positions} positions)\n\n"
                "Choose *Automatic* or a *Keep ratio* to compare with TRIM."
            )
        trim_ms, trim_positions = chat.prefill_ms(inputs, trim_ratio)
        return (
            f"{header}\n\n"
            f"- {mode_label(trim_ratio)}: **{trim_ms:.1f} ms** ({trim_positions} positions)\n"
            f"- TRIM off: **{off_ms:.1f} ms** ({off_positions} positions)\n\n"
            f"TRIM takes **{trim_ms / off_ms:.2f}x** the time of TRIM off."
        )

    def answer(image_upload, question: str, mode: str):
        """One question about one image: (answer text, heatmap, number of kept patches)."""
        image_path = uploaded_path(image_upload)
        question = check_question(question)
        try:
            trim_ratio = parse_trim_ratio(mode)
        except ValueError as error:
            raise gr.Error(str(error)) from None
        image = read_image(image_path, chat.processor.image_processor)
        try:
            reply = chat.prepare([user_turn(question, image)], trim_ratio)
        except ValueError as error:  # e.g. a prompt longer than the model accepts
            raise gr.Error(str(error)) from None
        text = ""
        for partial in chat.stream(reply):
            text = partial
        return text.strip(), reply.heatmap, reply.num_kept

    def clear():
        return [], [], None, None, "", ""

    # no analytics or version checks (they phone home), and a theme with local fonts: the page works offline
    with gr.Blocks(title=title, analytics_enabled=False) as demo:
        gr.Markdown(f"# {title}\n{INTRODUCTION[tiles_images(chat.processor.image_processor)]}")
        messages = gr.State([])  # the chat-template messages of the conversation (images included)
        conversation_image = gr.State(None)  # the uploaded file the conversation is about
        question = gr.Textbox(
            label="Question", placeholder="Ask about the image, then press Enter", elem_id="question", render=False
        )
        with gr.Row(equal_height=False):
            with gr.Column(scale=4):
                image = gr.Image(
                    type="filepath", sources=["upload", "clipboard"], label="Image", height=280, elem_id="image"
                )
                choice = gr.Radio([MODE_AUTO, MODE_RATIO, MODE_OFF], value=MODE_AUTO, label="TRIM", elem_id="mode")
                ratio = gr.Slider(
                    0.01, 1.0, value=0.25, step=0.01, label="Keep ratio (with 'Keep ratio')", elem_id="ratio"
                )
                gr.Examples(draw_examples(examples_folder), inputs=[image, question], label="Examples")
            with gr.Column(scale=5):
                chatbot = gr.Chatbot(label="Chat", height=380, elem_id="chat", feedback_options=None)
                question.render()
                with gr.Row():
                    send = gr.Button("Ask", variant="primary", elem_id="ask")
                    reset = gr.Button("New conversation", elem_id="clear")
            with gr.Column(scale=4):
                heatmap = gr.Image(
                    label="Kept patches, outlined",
                    type="pil",
                    format="png",
                    interactive=False,
                    height=380,
                    elem_id="heatmap",
                )
                kept = gr.Textbox(label="Image tokens TRIM kept", interactive=False, elem_id="kept-count")
                measure = gr.Button("Measure prefill time: TRIM vs off", elem_id="measure")
                prefill = gr.Markdown(elem_id="prefill")

        turn_outputs = [chatbot, messages, conversation_image, heatmap, kept, question]
        turn_inputs = [image, question, choice, ratio, messages, conversation_image]
        for trigger in (send.click, question.submit):
            trigger(
                respond,
                turn_inputs,
                turn_outputs,
                preprocess=False,  # `respond` reads the upload itself
                concurrency_id="model",
                api_visibility="private",
            )
        # moving the slider means "keep this ratio"
        ratio.input(lambda _: MODE_RATIO, ratio, choice, queue=False, api_visibility="private")
        reset.click(
            clear,
            None,
            [chatbot, messages, conversation_image, heatmap, kept, prefill],
            queue=False,
            api_visibility="private",
        )
        measure.click(measure_prefill, [choice, ratio, messages], prefill, concurrency_id="model", api_name="prefill")

        # the programmatic endpoint: the same model, one question, no chat state
        with gr.Column(visible=False):
            api_image = gr.Image(type="filepath", label="image")
            api_question = gr.Textbox(label="question")
            api_mode = gr.Textbox(label="mode", value="auto")
            api_answer = gr.Textbox(label="answer")
            api_heatmap = gr.Image(label="heatmap", type="pil", format="png")
            api_kept = gr.Number(label="kept", precision=0)
            api_button = gr.Button("answer")
        api_button.click(
            answer,
            [api_image, api_question, api_mode],
            [api_answer, api_heatmap, api_kept],
            api_name="answer",
            preprocess=False,  # `answer` reads the upload itself
            concurrency_id="model",
        )
    return demo


EXAMPLE = """\
python -m llava_trim.tools.app --model path/to/llava-v1.5-7b-trim --port 7860
# on every interface of this machine, with longer answers
python -m llava_trim.tools.app --model path/to/llava-v1.5-7b-trim --host 0.0.0.0 --max-new-tokens 512"""


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The page's command line (see `--help`)."""
    parser = command_parser(
        "python -m llava_trim.tools.app",
        "A Gradio page for a converted LLaVA-TRIM model: chat about an image, see what TRIM keeps.",
        EXAMPLE,
    )
    parser.add_argument("--model", required=True, help="Converted LLaVA-TRIM folder or Hub repository id.")
    parser.add_argument(
        "--host",
        default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"),
        help="Address to listen on (default 127.0.0.1, this machine only; 0.0.0.0 for every interface).",
    )
    parser.add_argument(
        "--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", 7860)), help="Port (default 7860)."
    )
    parser.add_argument("--title", default=None, help="Page title (default: LLaVA-TRIM and the model's name).")
    parser.add_argument(
        "--max-new-tokens",
        type=int,
        default=256,
        help=f"Longest answer in tokens (default 256, at most {MAX_NEW_TOKENS}).",
    )
    parser.add_argument("--device", default="auto", help="'auto' (GPU if available), 'cpu', 'cuda', 'cuda:1', ...")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"])
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    """Command-line entry point: load the model once, start the page with Gradio's queue; see `--help`."""
    args = parse_args(argv)
    if not 1 <= args.max_new_tokens <= MAX_NEW_TOKENS:
        raise SystemExit(f"--max-new-tokens must be between 1 and {MAX_NEW_TOKENS}, got {args.max_new_tokens}.")
    try:
        model, processor = load_model_and_processor(args.model, device=args.device, dtype=args.dtype)
    except OSError as error:  # not a folder, not on the Hub, or offline
        raise SystemExit(
            f"--model {args.model}: could not load a converted LLaVA-TRIM model ({error}). Pass the folder written by "
            "convert_checkpoint.py or its Hub repository id."
        ) from None
    title = args.title or f"LLaVA-TRIM: {Path(args.model.rstrip('/')).name}"
    demo = build_app(TrimChat(model, processor, max_new_tokens=args.max_new_tokens), title=title)
    launch(demo, args.host, args.port)


def launch(demo: gr.Blocks, host: str = "127.0.0.1", port: int = 7860, block: bool = True) -> gr.Blocks:
    """
    Serve `demo` with Gradio's queue: one request on the model at a time, up to `MAX_QUEUE` others waiting their turn
    in order (more are refused at once with "queue is full"), uploads over `MAX_UPLOAD_BYTES` refused.
    """
    demo.queue(default_concurrency_limit=1, max_size=MAX_QUEUE).launch(
        server_name=host,
        server_port=port,
        theme=THEME,
        css=CSS,
        prevent_thread_lock=not block,
        quiet=not block,
        max_file_size=MAX_UPLOAD_BYTES,
    )
    return demo


if __name__ == "__main__":
    main()
