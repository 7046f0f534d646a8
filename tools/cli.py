# Copyright 2026 The llava-trim authors. Licensed under the Apache License, Version 2.0.
"""What the tools' command lines share: `--help` that ends with a working example, and flag values read by the
project's own readers (a `ValueError` from one becomes argparse's one-line usage error)."""

import argparse
from collections.abc import Callable


class ExamplesHelpFormatter(argparse.HelpFormatter):
    """argparse's help, with the examples kept as written (line continuations and indentation intact)."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        if text.startswith("example"):
            return text
        return super()._fill_text(text, width, indent)


def examples_epilog(examples: str) -> str:
    """The end of a tool's `--help`: `examples` (shell lines, `#` comments and `\\` continuations) as written."""
    return "examples:\n" + "\n".join("  " + line if line else line for line in examples.strip("\n").splitlines())


def command_parser(prog: str, description: str, examples: str) -> argparse.ArgumentParser:
    """An `argparse.ArgumentParser` for a tool: `description` wrapped, then [`examples_epilog`]."""
    return argparse.ArgumentParser(
        prog=prog, description=description, epilog=examples_epilog(examples), formatter_class=ExamplesHelpFormatter
    )


def flag_value(read: Callable[[str], object], name: str) -> Callable[[str], object]:
    """`read` as an argparse `type=`: its `ValueError` message is shown as the flag's error; `name` names the value."""

    def parse(text: str):
        try:
            return read(text)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from None

    parse.__name__ = name
    return parse
