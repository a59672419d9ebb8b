"""Every `distil` command in the README's code blocks composes and validates as written (the CLI's own steps:
the bare-path shortcut, renamed keys, Hydra, the schema), so the documented commands cannot drift from the code."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from distilbert_cli.cli import COMMANDS, expand_run_dir
from distilbert_cli.config import compose_config, renamed_overrides, split_overrides
from distilbert_cli.sweeps import plan_members

README = Path(__file__).resolve().parents[1] / "README.md"
SPECS = {name: spec for spec in COMMANDS for name in (spec.name, *spec.aliases)}


def code_lines(text: str) -> list[str]:
    """The lines of fenced and indented code blocks, continuation lines joined."""
    lines, fenced, joined = [], False, ""
    for line in text.splitlines():
        if line.startswith("```"):
            fenced = not fenced
            continue
        if not (fenced or line.startswith("    ")):
            continue
        joined += line.strip()
        if joined.endswith("\\"):
            joined = joined[:-1] + " "
            continue
        lines.append(joined)
        joined = ""
    return lines


def readme_commands() -> list[list[str]]:
    """Each `distil <command> ...` (also behind `accelerate launch ... -m distilbert_cli` or torchrun) as argv; inside
    a `for VAR in VALUES; do` loop, once per value."""
    found, loop = [], None
    for line in code_lines(README.read_text()):
        if match := re.fullmatch(r"for (\w+) in ([^;]+); do", line):
            loop = (match[1], match[2].split())
            continue
        if line == "done":
            loop = None
            continue
        for part in [line.replace(f"${loop[0]}", value) for value in loop[1]] if loop else [line]:
            found += _commands(part)
    return found


def _commands(line: str) -> list[list[str]]:
    found = []
    for part in line.split("&&"):
        if not (part.split()[:1] == ["distil"] or "-m distilbert_cli " in part):
            continue  # not a command line (Python, YAML, a table)
        words = shlex.split(part, comments=True)
        if words[0] == "distil":
            found.append(words[1:])
        elif "distilbert_cli" in words and words[words.index("distilbert_cli") - 1] == "-m":
            found.append(words[words.index("distilbert_cli") + 1:])
    return found


COMMAND_LINES = readme_commands()


def test_the_readme_has_commands_for_every_stage():
    assert len(COMMAND_LINES) > 40
    assert {words[0] for words in COMMAND_LINES} >= {spec.name for spec in COMMANDS}


@pytest.mark.parametrize("words", COMMAND_LINES, ids=lambda words: " ".join(words)[:90])
def test_every_readme_command_composes_and_validates(words):
    """As the CLI does it (`...` is the README's "the rest as above"); a sweep's members each validate too."""
    command, *overrides = words
    assert command in SPECS, f"unknown command {command!r}"
    spec = SPECS[command]
    overrides, _ = renamed_overrides(expand_run_dir([word for word in overrides if word not in ("--cfg", "...")]))
    assert not [word for word in overrides if re.fullmatch(r"<[^>]+>", word)]
    own, members = (overrides, []) if spec.own_keys is None else split_overrides(overrides, spec.own_keys)
    cfg = compose_config(spec.config, own)
    if command == "sweep":
        assert not [member.error for member in plan_members(Path(cfg.run_dir), members, cfg.sweep.stages)
                    if member.error]
