"""Every command the README and docs/*.md show parses and validates as written.

Each `python SCRIPT ...` or `composer train.py ...` in a code block or an inline code span goes
through its command's own argument parsing (and, for train.py, the YAML and its overrides; for
generate.py and eval.py, the sampler settings they ask for) without running: a documented flag
that no longer exists, a value a command refuses or a combination it refuses fails here.
Placeholders (EXPORT, DATA, N...) are swapped for values of their kind.
"""

from __future__ import annotations

import argparse
import re
import runpy
import shlex
import sys

import pytest
from conftest import REPO

from cdcd_composer.commands import evaluate, generate
from cdcd_composer.config import load_config, parse_config

DOCS = [REPO / 'README.md', *sorted((REPO / 'docs').glob('*.md'))]
# Placeholders of a value a parser reads as a number or a choice (paths stay as written).
PLACEHOLDERS = {
    'N': '24',
    'T': '0.7',
    'S': 'euler',
    'DELTA': '0.1',
    'C': '1.15',
    'W': '2',
    'R': '1',
    'K': '2',
}
NOT_COMMANDS = ('python -m', 'python -X', 'python3 -m')


def documented_commands() -> list[tuple[str, str]]:
    """(where, command) for every command shown, code blocks and inline spans, continuations joined."""
    found = []
    for path in DOCS:
        text = path.read_text()
        blocks = re.findall(r'```[a-z]*\n(.*?)```', text, re.S)
        for block in blocks:
            for line in block.replace('\\\n', ' ').splitlines():
                line = line.strip().removeprefix('$ ')
                if line.startswith(('python ', 'composer ')):
                    found.append((path.name, line))
        for span in re.findall(r'`((?:python|composer) [^`]+)`', re.sub(r'```.*?```', '', text, flags=re.S)):
            found.append((path.name, ' '.join(span.split())))
    return [(where, cmd) for where, cmd in found if not cmd.startswith(NOT_COMMANDS)]


class Parsed(Exception):
    """Raised by the patched `parse_args` once a command line parsed: nothing runs after it."""


def parse(script: str, argv: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """The command's own parsing and validation of `argv`; SystemExit or ValueError when refused."""
    if script == 'train.py':
        parse_config(load_config(str(REPO / argv[0]), argv[1:]))
    elif script == 'generate.py':
        generate.requested_settings(generate.parse_args(argv))
    elif script == 'eval.py':
        evaluate.parse_args(argv)
    elif not any(word in (REPO / script).read_text() for word in ('ArgumentParser', 'import main')):
        assert not argv, f'{script} takes no arguments'
    else:  # any other script: its parser, stopped right after parsing
        original = argparse.ArgumentParser.parse_args

        def parse_then_stop(self, args=None, namespace=None):
            original(self, args, namespace)
            raise Parsed

        monkeypatch.setattr(argparse.ArgumentParser, 'parse_args', parse_then_stop)
        monkeypatch.setattr(sys, 'argv', [script, *argv])
        with pytest.raises(Parsed):
            runpy.run_path(str(REPO / script), run_name='__main__')


COMMANDS = documented_commands()


def test_the_docs_show_commands():
    scripts = {shlex.split(cmd, comments=True)[1] for _, cmd in COMMANDS}
    assert {'train.py', 'generate.py', 'eval.py', 'export.py', 'data_prep/convert_tinystories.py'} <= scripts


@pytest.mark.parametrize('where, command', COMMANDS, ids=[f'{w}:{c[:60]}' for w, c in COMMANDS])
def test_a_documented_command_parses_as_written(where, command, monkeypatch):
    words = [PLACEHOLDERS.get(w, w) for w in shlex.split(command, comments=True) if w != '...']
    if words[0] == 'composer':  # composer [-n N] train.py ...: the launcher's own flags go first
        words = words[words.index('train.py') :] if 'train.py' in words else words[1:]
    else:
        words = words[1:]
    script, argv = words[0], words[1:]
    if script == 'train.py' and not argv:
        return  # a mention of the command, not an invocation
    assert (REPO / script).is_file(), f'{where}: {command}: no {script} in the repository'
    try:
        parse(script, argv, monkeypatch)
    except SystemExit as e:
        pytest.fail(f'{where}: `{command}` is refused by its parser (exit {e.code})')
    except ValueError as e:
        pytest.fail(f'{where}: `{command}` is refused: {e}')


def readme_figures() -> list[tuple[str, str]]:
    """(what, figure) for each number in the README's results table."""
    rows = [line for line in (REPO / 'README.md').read_text().splitlines() if line.startswith('| ')][2:]
    found = []
    for row in rows:
        what, figure = [cell.strip() for cell in row.strip('|').split('|')][:2]
        found += [
            (what, number) for number in re.findall(r'\d[\d,.]*(?:%|x)?', figure) if number not in ('1', '2')
        ]
    return found


@pytest.mark.parametrize('what, figure', readme_figures())
def test_a_readme_figure_is_the_one_in_its_home(what, figure):
    """docs/results.md is every figure's home; the README's table repeats some, which must agree."""
    assert figure in (REPO / 'docs' / 'results.md').read_text(), (
        f'README: {what}: {figure} is not in docs/results.md'
    )
