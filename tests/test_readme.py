"""The README cannot drift: every spectrum-sm command in it parses, and the scan option table
names real options."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from spectrum_sm.cli import build_parser

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def readme_commands() -> list[str]:
    blocks = re.findall(r"```bash\n(.*?)```", README, flags=re.DOTALL)
    commands, current = [], ""
    for block in blocks:
        for line in block.splitlines():
            line = line.split("  #")[0].rstrip()
            if current:
                current += " " + line.rstrip("\\").strip()
            elif line.startswith("spectrum-sm "):
                current = line.rstrip("\\").strip()
            else:
                continue
            if not line.endswith("\\"):
                commands.append(current)
                current = ""
    return commands


@pytest.mark.parametrize("command", readme_commands())
def test_readme_commands_parse(command):
    args = shlex.split(command.replace("<", "X").replace(">", "X"))[1:]
    build_parser().parse_args(args)


def test_readme_lists_commands():
    assert len(readme_commands()) >= 8


def test_scan_option_table_matches_the_parser():
    scan_help = build_parser()._subparsers._group_actions[0].choices["scan"].format_help()
    table = README.split("### Output files")[0].split("| option | meaning |")[1]
    for option in re.findall(r"`(--[a-z-]+)", table):
        assert option in scan_help, option
