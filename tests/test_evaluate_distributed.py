"""The evaluation tool over several processes (torchrun, accelerate launch), on CPUs with Gloo: the merged answer file
equals the single-process run record for record, a resumed run answers each question exactly once, and a process that
died loses only its unfinished questions."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from llava_trim.tools.evaluate import main

SHORT = "\nAnswer the question using a single word or phrase."
TIMING = ("batch_size", "batch_seconds", "ttft_seconds")  # how the run was batched and timed, not what it answered


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("sharded")
    colours = {"red.png": (220, 40, 40), "blue.png": (40, 60, 220), "green.png": (40, 180, 60)}
    for name, colour in colours.items():
        image = Image.new("RGB", (96, 64), (245, 245, 245))
        image.paste(colour, (20, 10, 70, 50))
        image.save(root / name)
    questions = [
        {"question_id": index, "image": image, "text": text + SHORT}
        for index, (image, text) in enumerate(
            [
                ("red.png", "What colour is the box?"),
                ("red.png", "Is there a box?"),
                ("blue.png", "What colour is the box?"),
                ("blue.png", "How many boxes?"),
                ("green.png", "What colour is the box?"),
                ("green.png", "Is it a circle?"),
            ]
        )
    ]
    (root / "questions.jsonl").write_text("".join(json.dumps(q) + "\n" for q in questions))
    return root, questions


def args(model_dir, dataset, output):
    root, _ = dataset
    return [
        "--model",
        str(model_dir),
        "--questions",
        str(root / "questions.jsonl"),
        "--image-folder",
        str(root),
        "--output-dir",
        str(output),
        "--settings",
        "auto",
        "--batch-size",
        "2",
        "--max-new-tokens",
        "3",
        "--no-progress",
        "--no-plot",
    ]


def launch(launcher: list[str], arguments: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    command = [sys.executable, "-m", *launcher, "-m", "llava_trim.tools.evaluate", *arguments]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


TORCHRUN = ["torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
ACCELERATE = [
    "accelerate.commands.launch",
    "--multi_gpu",  # without it, accelerate starts a single process on a CPU-only machine
    "--num_processes",
    "2",
    "--num_machines",
    "1",
    "--mixed_precision",
    "no",
    "--dynamo_backend",
    "no",
]


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def comparable(record: dict) -> dict:
    metadata = {key: value for key, value in record["metadata"].items() if key not in TIMING}
    return {**{key: value for key, value in record.items() if key != "answer_id"}, "metadata": metadata}


@pytest.fixture(scope="module")
def single_run(model_dir, dataset, tmp_path_factory):
    output = tmp_path_factory.mktemp("one-process")
    assert main([*args(model_dir, dataset, output), "--device", "cpu"]) == 0
    return read_jsonl(output / "answers_auto.jsonl")


def test_two_torchrun_processes_equal_one(model_dir, dataset, single_run, tmp_path):
    _, questions = dataset
    output = tmp_path / "two-processes"
    result = launch(TORCHRUN, args(model_dir, dataset, output))
    # each process really is one of two (a process that believes it runs alone would answer all six)
    assert "[process 0 of 2] questions.jsonl, TRIM auto: answering 3 of the 6 unanswered questions" in result.stderr
    assert "[process 1 of 2] questions.jsonl, TRIM auto: answering 3 of the 6 unanswered questions" in result.stderr
    merged = read_jsonl(output / "answers_auto.jsonl")
    assert [record["question_id"] for record in merged] == [q["question_id"] for q in questions]
    assert [comparable(record) for record in merged] == [comparable(record) for record in single_run]
    assert len({record["answer_id"] for record in merged}) == 6
    assert sorted(path.name for path in output.iterdir()) == ["answers_auto.jsonl", "summary.json"]  # parts merged
    assert json.loads((output / "summary.json").read_text())["settings"][0]["num_answered"] == 6


def test_accelerate_resumes_what_a_dead_process_left(model_dir, dataset, single_run, tmp_path):
    _, questions = dataset
    output = tmp_path / "resumed"
    output.mkdir()
    # an earlier run of three processes: the merged file holds question 0; process 1 died after answering
    # question 3 and while writing question 4; process 2 died before answering anything
    (output / "answers_auto.jsonl").write_text(json.dumps(single_run[0]) + "\n")
    (output / "answers_auto.part1.jsonl").write_text(
        json.dumps(single_run[3]) + "\n" + json.dumps(single_run[4])[:40]  # the line cut short by the kill
    )
    (output / "answers_auto.part2.jsonl").write_text("")
    result = launch(ACCELERATE, args(model_dir, dataset, output))
    for rank in (0, 1):
        assert f"[process {rank} of 2] questions.jsonl, TRIM auto: answering 2 of the 4 unanswered" in result.stderr
    merged = read_jsonl(output / "answers_auto.jsonl")
    assert [record["question_id"] for record in merged] == [q["question_id"] for q in questions]  # each once
    assert merged[0] == single_run[0] and merged[3] == single_run[3]  # kept as written, not answered again
    assert [comparable(record) for record in merged] == [comparable(record) for record in single_run]
    assert not list(output.glob("*.part*"))


def _worker_pid(output, rank: int) -> int | None:
    """The pid of the evaluation process of `rank` writing to `output` (found through /proc)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            command = (entry / "cmdline").read_bytes().split(b"\0")
            environment = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"llava_trim.tools.evaluate" in command and str(output).encode() in command:
            if f"RANK={rank}".encode() in environment and b"LOCAL_RANK" in b" ".join(environment):
                return int(entry.name)
    return None


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds the worker process through /proc")
def test_a_killed_process_loses_only_its_unfinished_questions(model_dir, dataset, tmp_path):
    _, questions = dataset
    output = tmp_path / "killed"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    arguments = args(model_dir, dataset, output)
    arguments[arguments.index("--batch-size") + 1] = "1"
    arguments[arguments.index("--max-new-tokens") + 1] = "24"
    command = [sys.executable, "-m", *TORCHRUN, "-m", "llava_trim.tools.evaluate", *arguments]
    launcher = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    part = output / "answers_auto.part1.jsonl"
    try:
        deadline = time.monotonic() + 300
        while not (part.exists() and part.read_text().count("\n") >= 1):  # process 1 has answered a question
            assert time.monotonic() < deadline and launcher.poll() is None, "process 1 never answered"
            time.sleep(0.02)
        pid = _worker_pid(output, rank=1)
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        assert launcher.wait(timeout=300) != 0  # torchrun stops the other process and fails
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait()

    survived = [record for path in sorted(output.glob("answers_auto*.jsonl")) for record in read_jsonl_lenient(path)]
    assert 1 <= len(survived) < len(questions)
    assert main([*arguments, "--device", "cpu"]) == 0  # resume, here in one process
    merged = read_jsonl(output / "answers_auto.jsonl")
    assert [record["question_id"] for record in merged] == [q["question_id"] for q in questions]  # each once
    kept = {record["answer_id"] for record in merged}
    assert {record["answer_id"] for record in survived} <= kept  # what was written before the kill is kept


def read_jsonl_lenient(path):
    """The complete lines of a file a killed process may have left mid-line."""
    lines = path.read_text(encoding="utf-8").split("\n")[:-1]
    return [json.loads(line) for line in lines if line.strip()]
