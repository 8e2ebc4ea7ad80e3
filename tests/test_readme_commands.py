"""Every command in the README's bash blocks is spelled as the code takes it: `avis` command lines parse with the
current `avis` parser, `python -m module` lines name flags the module's --help lists, and the programs are called
the one way the README's Set-up states (`.venv/bin/...`)."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def readme_commands(text: str) -> list[str]:
    """The command lines of the ```bash blocks: backslash continuations joined, trailing comments dropped."""
    lines: list[str] = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        joined = block.replace("\\\n", " ")
        for line in joined.splitlines():
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            lines.append(shlex.join(shlex.split(line, comments=True)) if "#" in line else line)
    return lines


def test_readme_commands_are_extracted():
    """The extractor on a hand-written block: continuations joined, comments and blank lines dropped."""
    text = "x\n```bash\n.venv/bin/avis ask -m a \\\n    --k 5 \"q\"  # a comment\n\n# only a comment\nmake demo\n```\n"
    assert readme_commands(text) == [".venv/bin/avis ask -m a --k 5 q", "make demo"]


COMMANDS = readme_commands((ROOT / "README.md").read_text(encoding="utf-8"))


def test_every_program_is_called_through_the_venv():
    assert len(COMMANDS) >= 8
    for cmd in COMMANDS:
        prog = cmd.split()[0]
        assert prog == "make" or prog.startswith(".venv/bin/"), f"README command not run as Set-up says: {cmd}"


@pytest.mark.parametrize("cmd", [c for c in COMMANDS if c.startswith(".venv/bin/avis ")])
def test_avis_commands_parse(cmd):
    from avis_llamacpp.cli import build_parser

    argv = shlex.split(cmd)[1:]
    try:
        build_parser().parse_args(argv)
    except SystemExit as e:  # argparse's exit on an unknown or malformed flag
        pytest.fail(f"README command does not parse ({e}): {cmd}")


@pytest.mark.parametrize("cmd", [c for c in COMMANDS if c.startswith(".venv/bin/python -m ")])
def test_module_commands_name_existing_flags(cmd):
    argv = shlex.split(cmd)
    module = argv[2]
    r = subprocess.run([sys.executable, "-m", module, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    for flag in (a.split("=")[0] for a in argv[3:] if a.startswith("--")):
        assert flag in r.stdout, f"{module} --help does not list {flag} (README: {cmd})"
