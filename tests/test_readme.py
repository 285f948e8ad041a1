"""The README and the docs/ pages cannot drift: every spectrum-sm command in them parses, the
scan option table names real options, and every relative link points to a file that exists."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from spectrum_sm.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SCAN_PAGE = ROOT / "docs" / "scan.md"


def page_name(page: Path) -> str:
    return page.relative_to(ROOT).as_posix()


def commands(text: str) -> list[str]:
    """Every ``spectrum-sm ...`` command in the text's ```bash blocks, continuation lines joined
    and ``  # comments`` dropped."""
    blocks = re.findall(r"```bash\n(.*?)```", text, flags=re.DOTALL)
    found, current = [], ""
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
                found.append(current)
                current = ""
    return found


ALL_COMMANDS = [(page_name(p), c) for p in PAGES for c in commands(p.read_text())]


@pytest.mark.parametrize(("page", "command"), ALL_COMMANDS)
def test_documented_commands_parse(page, command):
    args = shlex.split(command.replace("<", "X").replace(">", "X"))[1:]
    try:
        build_parser().parse_args(args)
    except SystemExit as exc:
        pytest.fail(f"{page}: {command!r} does not parse (exit {exc.code})")


def test_readme_lists_commands():
    # The README keeps the three things a user does; the pages hold the rest, one per command.
    readme = commands(PAGES[0].read_text())
    assert {c.split()[1] for c in readme} >= {"scan", "run", "compare"}
    assert len(ALL_COMMANDS) >= 20
    documented = {c.split()[1] for _, c in ALL_COMMANDS}
    subcommands = build_parser()._subparsers._group_actions[0].choices
    assert documented >= set(subcommands) - {"train"}, set(subcommands) - documented


def test_commands_are_found_in_continued_lines():
    text = "```bash\nspectrum-sm scan m \\\n    --top-percent 5  # a comment\nls\n```\n"
    assert commands(text) == ["spectrum-sm scan m --top-percent 5"]


def scan_option_table() -> str:
    text = SCAN_PAGE.read_text()
    assert "| option | meaning |" in text, f"{page_name(SCAN_PAGE)} lost its scan option table"
    rows = text.split("| option | meaning |", 1)[1].strip().splitlines()
    table = []
    for row in rows:
        if not row.startswith("|"):
            break
        table.append(row)
    return "\n".join(table)


def test_scan_option_table_matches_the_parser():
    scan_help = build_parser()._subparsers._group_actions[0].choices["scan"].format_help()
    options = re.findall(r"`(--[a-z-]+)", scan_option_table())
    assert len(options) >= 10
    for option in options:
        assert option in scan_help, f"{page_name(SCAN_PAGE)}: {option} is not a scan option"


def test_scan_option_table_covers_the_parser():
    scan = build_parser()._subparsers._group_actions[0].choices["scan"]
    table = scan_option_table()
    missing = [
        o
        for action in scan._actions
        for o in action.option_strings
        if o.startswith("--") and o != "--help" and f"`{o}" not in table
    ]
    assert not missing, f"{page_name(SCAN_PAGE)}'s option table leaves out {missing}"


LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.DOTALL)
    return {slug(m) for m in re.findall(r"^#+ (.+)$", text, flags=re.MULTILINE)}


def relative_links(page: Path) -> list[str]:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.DOTALL)
    text = re.sub(r"`[^`\n]*`", "", text)
    return [t for t in LINK.findall(text) if not re.match(r"^[a-z]+:", t)]


@pytest.mark.parametrize(
    ("page", "target"), [(page_name(p), t) for p in PAGES for t in relative_links(p)]
)
def test_relative_links_point_to_files(page, target):
    path, _, anchor = target.partition("#")
    source = ROOT / page
    file = (source.parent / path).resolve() if path else source
    assert file.exists(), f"{page}: link {target!r} points to no file"
    if anchor and file.suffix == ".md":
        assert anchor in anchors(file), f"{page}: link {target!r}: no heading #{anchor}"


def test_every_page_is_linked_from_the_readme():
    linked = {(ROOT / t.partition("#")[0]).resolve() for t in relative_links(PAGES[0])}
    unlinked = [page_name(p) for p in PAGES[1:] if p.resolve() not in linked]
    assert not unlinked, f"README.md does not link to {unlinked}"


def test_the_link_check_can_fail(tmp_path):
    page = tmp_path / "p.md"
    page.write_text("[a](missing.md) [b](https://x.org) `[c](code.md)` [d](#here)\n# Here\n")
    assert relative_links(page) == ["missing.md", "#here"]
    assert "here" in anchors(page)
    assert slug("Account setup: least-privilege IAM policies") == (
        "account-setup-least-privilege-iam-policies"
    )


def test_readme_states_the_test_command():
    # CI runs .ci/run, which runs scripts/test.sh: the README must say that command.
    assert "bash scripts/test.sh" in (ROOT / ".ci" / "run").read_text()
    assert "bash scripts/test.sh" in PAGES[0].read_text()
