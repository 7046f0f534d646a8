"""The Gradio page under a burst of requests: every request gets its answer or its refusal, none lost or hung, the
answers are those of the same requests one at a time, the server's memory stays bounded, and it answers afterwards.

The page runs in its own process (`python -m llava_trim.tools.app`) on the tiny model, on 127.0.0.1; its peak memory
is that process's `VmHWM`. Every wait is bounded: the test stops by itself.
"""

import os
import struct
import subprocess
import sys
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("gradio")
gradio_client = pytest.importorskip("gradio_client")
pytestmark = pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads VmHWM from /proc")

from test_app import drawn_picture, free_port  # noqa: E402

QUESTION = "What is the colour of the ball?"
REQUEST_SECONDS = 120  # no request may wait longer than this for its answer or refusal
START_SECONDS = 180  # the server loads the model and listens within this
# The server's peak resident memory may grow by at most this much over its size after its first answer: the burst
# holds 8 requests at once, decoded images included (a 40000 x 20 image built its 40000 x 40000 canvas before: 20 GB).
PEAK_GROWTH_BYTES = 512 * 1024 * 1024


def wide_strip(path: Path) -> Path:
    """40000 x 20 pixels: the image whose square canvas took 20 GB."""
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (20, 40000, 3), dtype=np.uint8)).save(path)
    return path


def over_limit(path: Path) -> Path:
    """A PNG whose header says 8000 x 8000 (64 million pixels), with almost no data: refused before decoding."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", 8000, 8000, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)))
    return path


def vm_hwm(pid: int) -> int:
    """Peak resident memory of process `pid`, in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


def vm_rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


@pytest.fixture(scope="module")
def page(model_dir, tmp_path_factory):
    """The page's own process on the tiny model; its address and process id."""
    port = free_port()
    log = tmp_path_factory.mktemp("server") / "server.log"
    command = [sys.executable, "-m", "llava_trim.tools.app", "--model", str(model_dir), "--port", str(port)]
    command += ["--device", "cpu", "--max-new-tokens", "8"]
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False"}
    with open(log, "w") as output:
        server = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, env=environment)
    address = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + START_SECONDS
    client = None
    while client is None and time.monotonic() < deadline and server.poll() is None:
        try:
            client = gradio_client.Client(address, verbose=False)
        except Exception:
            time.sleep(1)
    if client is None:
        server.kill()
        server.wait(timeout=30)
        pytest.fail(f"the page did not start within {START_SECONDS} s:\n{log.read_text()[-3000:]}")
    yield address, server.pid
    server.terminate()
    try:
        server.wait(timeout=30)
    except subprocess.TimeoutExpired:
        server.kill()
        server.wait(timeout=30)


def ask(address: str, image: Path, question: str, mode: str) -> tuple[str, object]:
    """One `answer` request with a bounded wait: ("answer", (text, kept)) or ("refused", message)."""
    from gradio_client import Client, handle_file

    job = Client(address, verbose=False).submit(handle_file(str(image)), question, mode, api_name="/answer")
    try:
        text, _, kept = job.result(timeout=REQUEST_SECONDS)
    except TimeoutError:
        return "timed out", None
    except Exception as error:  # the page's refusal, as gradio_client raises it
        return "refused", str(error)
    return "answer", (text, kept)


def test_a_burst_of_requests_each_gets_its_answer_or_refusal(page, tmp_path):
    address, pid = page
    pictures = {
        "ball": drawn_picture(tmp_path / "ball.png"),
        "wide": wide_strip(tmp_path / "wide.png"),
        "huge": over_limit(tmp_path / "huge.png"),
        "text": tmp_path / "notes.png",
    }
    pictures["text"].write_text("not a picture")
    kinds = [
        ("ball", QUESTION, "auto"),
        ("wide", QUESTION, "auto"),
        ("huge", QUESTION, "auto"),
        ("ball", "   ", "auto"),
        ("text", QUESTION, "auto"),
        ("ball", QUESTION, "0.25"),
        ("wide", QUESTION, "off"),
        ("ball", QUESTION, "off"),
    ]
    expected_refusals = {
        2: "over the limit of 50,000,000",
        3: "The question is empty",
        4: "Could not open 'notes.png'",
    }

    one_at_a_time = [ask(address, pictures[name], question, mode) for name, question, mode in kinds]
    after_first = vm_rss(pid)
    for index, (outcome, value) in enumerate(one_at_a_time):
        if index in expected_refusals:
            assert outcome == "refused" and expected_refusals[index] in value, (kinds[index], outcome, value)
        else:
            assert outcome == "answer", (kinds[index], outcome, value)

    burst = [kinds[index % len(kinds)] for index in range(24)]  # 24 requests, 3 of each kind
    start = time.monotonic()
    with ThreadPoolExecutor(max_workers=8) as pool:
        futures = [pool.submit(ask, address, pictures[name], question, mode) for name, question, mode in burst]
        results = [future.result(timeout=3 * REQUEST_SECONDS) for future in futures]
    seconds = time.monotonic() - start
    peak = vm_hwm(pid)

    assert not [kind for kind, (outcome, _) in zip(burst, results, strict=True) if outcome == "timed out"]
    for index, result in enumerate(results):
        assert result == one_at_a_time[index % len(kinds)], (burst[index], result)
    assert peak - after_first < PEAK_GROWTH_BYTES, (peak, after_first)
    print(
        f"\n24 requests from 8 threads in {seconds:.1f} s; server peak {peak / 2**20:.0f} MiB, "
        f"{(peak - after_first) / 2**20:.0f} MiB over its size after the first answers"
    )
    # the page still answers afterwards
    assert ask(address, pictures["ball"], QUESTION, "auto") == one_at_a_time[0]


def test_page_limits_are_refused_with_a_message(page, tmp_path):
    address, _ = page
    picture = drawn_picture(tmp_path / "ball.png")
    from llava_trim.tools import app

    outcome, message = ask(address, picture, "why? " * (app.MAX_QUESTION_CHARS // 5 + 1), "auto")
    assert outcome == "refused" and f"over the page's limit of {app.MAX_QUESTION_CHARS:,}" in message
    big = tmp_path / "big.bin"
    with open(big, "wb") as file:
        file.truncate(app.MAX_UPLOAD_BYTES + 1)  # sparse: no memory or disk taken
    outcome, message = ask(address, big, QUESTION, "auto")
    assert outcome == "refused" and "exceeds the maximum file size" in message, (outcome, message)


def test_conversation_and_question_limits():
    from llava_trim.tools import app

    turn = [app.user_turn("Is it red?", None), {"role": "assistant", "content": [{"type": "text", "text": "Yes."}]}]
    app.check_turns(turn * (app.MAX_TURNS - 1))
    with pytest.raises(app.gr.Error, match=f"limit of {app.MAX_TURNS} questions"):
        app.check_turns(turn * app.MAX_TURNS)
    assert app.check_question("  Why?  ") == "Why?"
    with pytest.raises(app.gr.Error, match="The question is empty"):
        app.check_question(" ")
    with pytest.raises(app.gr.Error, match="over the page's limit"):
        app.check_question("a" * (app.MAX_QUESTION_CHARS + 1))
