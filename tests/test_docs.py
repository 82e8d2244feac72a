"""Help is checked documentation: every command has help with an example,
and README.md's usage section shows every command."""

from __future__ import annotations

import re
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from aptlayer.cli import cli
from aptlayer.cli.tree import walk

README = Path(__file__).resolve().parent.parent / "README.md"


COMMANDS = [(path, cmd) for path, cmd, _ in walk(cli)]
IDS = [" ".join(path) or "apt-layer" for path, _ in COMMANDS]


def usage_section() -> str:
    text = README.read_text()
    match = re.search(r"^## Usage\n(.*?)(?=^## )", text, re.S | re.M)
    assert match, "README.md has no '## Usage' section"
    return match.group(1)


@pytest.mark.parametrize("path, command", COMMANDS, ids=IDS)
def test_help_has_an_example(path: tuple[str, ...], command: click.Command) -> None:
    assert command.help and "Example:" in command.help
    example = command.help.split("Example:", 1)[1]
    assert "apt-layer " + " ".join(path) in example or not path


@pytest.mark.parametrize("path, command", [(p, c) for p, c in COMMANDS if c.add_help_option],
                         ids=[i for i, (_, c) in zip(IDS, COMMANDS) if c.add_help_option])
def test_help_option_prints_it(path: tuple[str, ...], command: click.Command) -> None:
    result = CliRunner().invoke(cli, [*path, "--help"], prog_name="apt-layer")
    assert result.exit_code == 0
    assert result.output.startswith(f"Usage: apt-layer {' '.join(path)}".rstrip())
    assert "\nExample:\n" in re.sub(r"^ +", "", result.output, flags=re.M)


def test_drop_ins_leave_help_to_the_upstream_parser() -> None:
    """``composefs mkcomposefs|info|mount`` take exactly upstream's arguments, so no --help of ours."""
    assert {p[-1] for p, c in COMMANDS if not c.add_help_option} == {"mkcomposefs", "info", "mount"}


@pytest.mark.parametrize("path", [p for p, _ in COMMANDS if p], ids=IDS[1:])
def test_readme_usage_shows_every_command(path: tuple[str, ...]) -> None:
    command = "apt-layer " + " ".join(path)
    assert command in usage_section(), f"README.md's usage section lacks `{command}`"
