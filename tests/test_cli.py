"""The `explainer` console script: every command dispatches to its module's own parser, and every --help shows
the defaults of the options that have one."""

from __future__ import annotations

import argparse

import pytest

from explainer import cli
from explainer.arguments import HelpFormatter


class _Parsed(Exception):
    """Raised instead of parsing, so a command's parser can be inspected without running the command."""

    def __init__(self, parser: argparse.ArgumentParser) -> None:
        self.parser = parser


def _parser_of(command: str, monkeypatch) -> argparse.ArgumentParser:
    def capture(self, args=None, namespace=None):
        raise _Parsed(self)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_known_args", capture)
    with pytest.raises(_Parsed) as info:
        cli.main([command])
    return info.value.parser


def _all_parsers(parser: argparse.ArgumentParser):
    yield parser
    for action in parser._actions:  # argparse has no public walk over sub-commands
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from _all_parsers(sub)


def _meaningful_default(action: argparse.Action) -> bool:
    return action.option_strings and action.default not in (None, argparse.SUPPRESS) and action.default is not False \
        and not isinstance(action, argparse._HelpAction)


@pytest.mark.parametrize("command", list(cli.COMMANDS))
def test_every_help_shows_the_defaults(command, monkeypatch):
    parser = _parser_of(command, monkeypatch)
    assert parser.prog.startswith(f"explainer {command}"), parser.prog
    for p in _all_parsers(parser):
        assert issubclass(p.formatter_class, HelpFormatter), f"explainer {command}: {p.prog} uses {p.formatter_class}"
        for action in filter(_meaningful_default, p._actions):
            formatter = p._get_formatter()  # the entry of this one option, as --help prints it
            formatter.add_argument(action)
            entry = " ".join(formatter.format_help().split())
            assert "default" in entry, f"{p.prog} --help does not show the default of {action.option_strings[-1]} " \
                                       f"({action.default!r}): {entry!r}"


def test_help_formatter_appends_the_value_once():
    parser = argparse.ArgumentParser(formatter_class=HelpFormatter)
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument("--workers", type=int, default=4, help="worker processes (default: CPU count)")
    parser.add_argument("--quiet", action="store_true", help="less output")
    text = " ".join(parser.format_help().split())
    assert "--nodes NODES (default: 1)" in text
    assert "worker processes (default: CPU count) -" in text + " -"  # its own wording, not a second default
    assert "less output (default" not in text


def test_unknown_command_and_bare_call(capsys):
    assert cli.main(["frobnicate"]) == 2
    assert "unknown command 'frobnicate'" in capsys.readouterr().err
    assert cli.main([]) == 2
    listed = capsys.readouterr().out
    for command in cli.COMMANDS:
        assert f"  {command} " in listed
