"""Every tool's `--help` ends with examples that are whole shell commands its own parser accepts."""

import shlex

import pytest

from llava_trim.tools import evaluate, finetune, visualize


def example_commands(help_text: str, program: str) -> list[list[str]]:
    """The arguments of each example in `help_text` (comments dropped, backslash continuations joined)."""
    examples = help_text.split("examples:\n", 1)[1]
    lines = [line.strip() for line in examples.splitlines() if line.strip() and not line.strip().startswith("#")]
    commands = "\n".join(lines).replace(" \\\n", " ").splitlines()  # one line per command
    return [shlex.split(command.split(program, 1)[1]) for command in commands]


@pytest.mark.parametrize(
    ("tool", "parse"),
    [(evaluate, evaluate.parse_args), (visualize, visualize.parse_args), (finetune, finetune.parse_args)],
)
def test_help_examples_parse(tool, parse, capsys):
    with pytest.raises(SystemExit):
        parse(["--help"])
    help_text = capsys.readouterr().out
    commands = example_commands(help_text, f"-m llava_trim.tools.{tool.__name__.rsplit('.', 1)[1]}")
    assert commands, help_text[-500:]
    for command in commands:
        assert parse(command) is not None, command
