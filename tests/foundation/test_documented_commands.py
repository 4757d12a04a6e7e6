"""Every ``xa-*`` command the README and the docs show parses and composes as a shell would pass it.

Commands are read from fenced code blocks and inline code in README.md, docs/*.md and the package's
README.md files, split with shell rules (``shlex``: quotes removed, comments dropped, ``\\`` continuations
joined), so a quoting mistake fails here as it would in a user's shell. Hydra tools (xa-train, xa-eval
with a checkpoint, xa-sample) go through the CLI's own pre-check (compose + validate, what ``--cfg job``
prints); the other tools through their argument parsers. Placeholders (``<run>``, ``DIR``, ``...``) stand
for paths the reader fills in.
"""

from __future__ import annotations

import re
import shlex

import pytest

from xa_lightning.paths import repo_root

ROOT = repo_root()
DOCUMENTS = [
    ROOT / "README.md",
    *sorted((ROOT / "docs").glob("*.md")),
    *sorted((ROOT / "xa_lightning").glob("**/README.md")),
]
HYDRA_TOOLS = {"xa-train": "train", "xa-eval": "eval", "xa-sample": "sample"}
ENV_ASSIGNMENT = re.compile(r"^[A-Z_][A-Z0-9_]*=")
PLACEHOLDER = re.compile(r"<[a-z_ -]+>")


def _fenced_lines(text: str) -> list[str]:
    lines, inside, pending = [], False, ""
    for line in text.splitlines():
        if line.strip().startswith("```"):
            inside = not inside
            continue
        if not inside:
            continue
        line = pending + line.strip()
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        pending = ""
        lines.append(line)
    return lines


def _inline_commands(text: str) -> list[str]:
    """Inline code that is a command (a tool and its arguments), not a mention of a tool's name."""
    return [code for code in re.findall(r"`([^`\n]+)`", text) if code.startswith("xa-") and " " in code.strip()]


def _from_synopsis(line: str) -> str:
    """A usage synopsis as one concrete command: ``[--opt X]`` -> ``--opt X``, ``a|b`` -> ``a``."""
    line = re.sub(r"\[([^\[\]]*)\]", r"\1", line)
    return re.sub(r"(?<![|\w])([\w.-]+)(\|[\w.-]+)+", r"\1", line)


def shell_words(line: str) -> list[str]:
    """The argv a POSIX shell passes for ``line`` (placeholders filled in, ``VAR=value`` prefixes dropped)."""
    words = shlex.split(_from_synopsis(PLACEHOLDER.sub("RUN", line)), comments=True)
    while words and ENV_ASSIGNMENT.match(words[0]):
        words = words[1:]
    return words


def documented_commands() -> list[tuple[str, str]]:
    """(where, line) for every documented line that runs an ``xa-*`` tool."""
    found: list[tuple[str, str]] = []
    for document in DOCUMENTS:
        text = document.read_text(encoding="utf-8")
        for line in _fenced_lines(text) + _inline_commands(text):
            first = re.sub(r"^([A-Z_][A-Z0-9_]*=\S+\s+)*", "", line)
            if first.startswith("xa-"):
                found.append((f"{document.relative_to(ROOT)}: {line}", line))
    return found


COMMANDS = documented_commands()


def test_the_documents_show_commands():
    tools = {shell_words(line)[0] for _, line in COMMANDS}
    assert {"xa-train", "xa-eval", "xa-sample", "xa-tables", "xa-bench", "xa-data"} <= tools


def _check_plain(tool: str, argv: list[str]) -> None:
    if tool == "xa-eval":
        from xa_lightning.metrics.cli import build_parser

        build_parser().parse_args(argv)
    elif tool == "xa-data":
        from xa_lightning.data.cli import _parser

        _parser().parse_args(argv)
    elif tool == "xa-tables":
        from xa_lightning import tables

        tables.build_parser().parse_args(argv)
    elif tool == "xa-bench":
        from xa_lightning.bench import BENCHMARKS

        assert argv and (argv[0] in BENCHMARKS or argv[0] == "NAME"), f"xa-bench {argv[:1]}: no such benchmark"
    else:
        raise AssertionError(f"unknown tool {tool}")


@pytest.mark.parametrize("where,line", COMMANDS, ids=[where for where, _ in COMMANDS])
def test_documented_command_parses_and_composes(where: str, line: str):
    from hydra._internal.utils import get_args_parser

    from xa_lightning.cli import FOLDER_EVAL_COMMANDS
    from xa_lightning.config import compose, validate

    tool, *argv = shell_words(line)
    if tool in HYDRA_TOOLS and not (tool == "xa-eval" and argv and argv[0] in FOLDER_EVAL_COMMANDS + ("-h", "--help")):
        args = get_args_parser().parse_args(argv)
        validate(compose(HYDRA_TOOLS[tool], args.overrides))
    else:
        _check_plain(tool, argv)
