"""The Space writer (`tools/space.py`): the folder a Hugging Face Space needs, and that its app really starts."""

import os
import socket
import subprocess
import sys
import time

import pytest

pytest.importorskip("gradio")
# Gradio's queue calls pandas APIs that pandas 3 deprecates; not this project's to fix
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:gradio.queueing")

from llava_trim.testing_utils.tiny import tiny_model  # noqa: E402
from llava_trim.testing_utils.tiny_tokenizers import build_tiny_processor  # noqa: E402
from llava_trim.tools.space import PACKAGE, PACKAGE_MODULES, TOOLS_MODULES, main, write_space  # noqa: E402


def front_matter(readme: str) -> dict[str, str]:
    """The `key: value` lines between the README's leading `---` lines (the Space metadata)."""
    lines = readme.splitlines()
    assert lines[0] == "---"
    end = lines.index("---", 1)
    return dict(line.split(": ", 1) for line in lines[1:end] if ": " in line)


def test_space_folder(tmp_path):
    folder = write_space(tmp_path / "space", "your-name/llava-v1.5-7b-trim", title="LLaVA-TRIM: demo")
    assert sorted(path.name for path in folder.iterdir()) == ["README.md", "app.py", PACKAGE, "requirements.txt"]
    metadata = front_matter((folder / "README.md").read_text())
    assert metadata["sdk"] == "gradio"
    assert metadata["app_file"] == "app.py"
    assert metadata["title"] == '"LLaVA-TRIM: demo"'
    assert metadata["sdk_version"].split(".")[0] == "6"
    assert "  - your-name/llava-v1.5-7b-trim" in (folder / "README.md").read_text()
    requirements = (folder / "requirements.txt").read_text().splitlines()
    assert any(line.startswith("transformers") for line in requirements)
    assert any(line.startswith("torch") for line in requirements)
    assert not any("gradio" in line for line in requirements)  # the Space installs its sdk_version
    assert sorted(path.name for path in (folder / PACKAGE).iterdir()) == sorted([*PACKAGE_MODULES, "tools"])
    assert sorted(path.name for path in (folder / PACKAGE / "tools").iterdir()) == sorted(TOOLS_MODULES)
    assert "your-name/llava-v1.5-7b-trim" in (folder / "app.py").read_text()
    assert not [path.name for path in tmp_path.iterdir() if path.name != "space"]  # no staging folder left


def test_space_refuses_local_folders_bad_ids_and_existing_output(tmp_path):
    with pytest.raises(ValueError, match="local folder.*push-to-hub"):
        write_space(tmp_path / "space", str(tmp_path))
    with pytest.raises(ValueError, match="not a Hub repository id"):
        write_space(tmp_path / "space", "not a repo id")
    write_space(tmp_path / "space", "your-name/model")
    with pytest.raises(FileExistsError, match="--overwrite"):
        write_space(tmp_path / "space", "your-name/other")
    write_space(tmp_path / "space", "your-name/other", overwrite=True)
    assert "your-name/other" in (tmp_path / "space" / "app.py").read_text()
    with pytest.raises(SystemExit, match="not a Hub repository id"):
        main(["--model", "bad id", "--output", str(tmp_path / "other")])
    assert not (tmp_path / "other").exists()


def test_space_app_starts_and_answers(tmp_path):
    """The written app.py, run from the Space folder with the copied modules, serves the `answer` endpoint."""
    from gradio_client import Client, handle_file
    from PIL import Image

    model_dir = tmp_path / "model"
    build_tiny_processor(model_dir)
    tiny_model(seed=0).save_pretrained(model_dir)
    folder = write_space(tmp_path / "space", "your-name/llava-v1.5-7b-trim")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    picture = tmp_path / "grey.png"
    Image.new("RGB", (64, 48), (128, 128, 128)).save(picture)

    # the Space's own command line, with the Hub id replaced by the local tiny model (arguments after it win)
    command = [sys.executable, "app.py", "--model", str(model_dir), "--host", "127.0.0.1", "--port", str(port)]
    command += ["--max-new-tokens", "4"]
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(folder)}
    server = subprocess.Popen(command, cwd=folder, env=environment, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                client = Client(f"http://127.0.0.1:{port}/", verbose=False)
                break
            except Exception:
                assert server.poll() is None, server.stdout.read().decode()
                assert time.monotonic() < deadline, "the Space app did not start in 120 s"
                time.sleep(1)
        text, heatmap, kept = client.predict(handle_file(str(picture)), "What is this?", "0.5", api_name="/answer")
        assert kept == 288 and isinstance(text, str)
        info = client.view_api(print_info=False, return_format="dict")
        assert "/answer" in info["named_endpoints"]
    finally:
        server.terminate()
        server.wait(timeout=30)
    # the page ran from the copied modules, not from the installed package
    check = "import llava_trim.tools.app as app; print(app.__file__)"
    printed = subprocess.run([sys.executable, "-c", check], cwd=folder, capture_output=True, text=True, check=True)
    assert printed.stdout.strip() == str(folder / PACKAGE / "tools" / "app.py")
