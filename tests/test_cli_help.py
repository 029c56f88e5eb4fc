"""Every option of every ``fedfleet`` command says its default in ``--help``.

A generic check over the parser's actions: a new option whose help does not show its default fails
here. An option that takes a value shows "default" in its help (what happens without it, when its
default is None or empty), and the default value itself when it has a concrete one. Flags (off
unless given), required options and members of a required either-or group have nothing to show.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import run_fedfleet
from fedfleet.cli import build_parser

FLAG_ACTIONS = (argparse._StoreTrueAction, argparse._StoreFalseAction, argparse._StoreConstAction,
                argparse._HelpAction, argparse._VersionAction, argparse._CountAction)


def commands(parser: argparse.ArgumentParser, prog: str = "fedfleet") -> Iterator[tuple[str, argparse.ArgumentParser]]:
    """The parser and every subcommand's, recursively: ("fedfleet aws up", its parser), ..."""
    yield prog, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from commands(sub, f"{prog} {name}")


def options(parser: argparse.ArgumentParser) -> Iterator[argparse.Action]:
    """The options that take a value and may be left out."""
    either_or = {id(a) for g in parser._mutually_exclusive_groups if g.required for a in g._group_actions}
    for action in parser._actions:
        if (action.option_strings and not action.required and id(action) not in either_or
                and not isinstance(action, FLAG_ACTIONS)):
            yield action


def shown(default: object) -> list[str]:
    """Ways a help text may write ``default``: 300.0 as 300, Path('x') as x."""
    if isinstance(default, float):
        return [f"{default:g}", str(default)]
    if isinstance(default, Path | str | int):
        return [str(default)]
    return []


@pytest.fixture
def parser(monkeypatch: pytest.MonkeyPatch) -> argparse.ArgumentParser:
    monkeypatch.delenv("FEDFLEET_LOG_LEVEL", raising=False)  # --log-level's default comes from it
    return build_parser()


ALL_COMMANDS = [name for name, _ in commands(build_parser())]


def test_every_command_is_checked() -> None:
    assert {"fedfleet run", "fedfleet coordinator", "fedfleet worker", "fedfleet serve", "fedfleet report",
            "fedfleet certs", "fedfleet data download", "fedfleet aws up", "fedfleet aws sync"} <= set(ALL_COMMANDS)


@pytest.mark.parametrize("command", ALL_COMMANDS)
def test_every_option_shows_its_default(parser: argparse.ArgumentParser, command: str) -> None:
    sub = dict(commands(parser))[command]
    missing = []
    for action in options(sub):
        text = " ".join((action.help % {**vars(action), "prog": sub.prog}).split()) if action.help else ""
        wanted = shown(action.default) if action.default not in ("", [], None) else []
        if "default" not in text.lower() or (wanted and not any(w in text for w in wanted)):
            missing.append(f"{'/'.join(action.option_strings)} (default {action.default!r}): {text!r}")
    assert not missing, f"{command} --help does not show these defaults:\n" + "\n".join(missing)


@pytest.mark.parametrize("command", ["worker", "coordinator", "serve", "run"])
def test_help_runs_and_shows_defaults(command: str) -> None:
    r = run_fedfleet(command, "--help", timeout=60)
    assert r.returncode == 0, r.stderr
    text = " ".join(r.stdout.split())
    expected = {"worker": ["--give-up", "[default 300]", "[default .fedfleet-worker]", "[default HOST-PID]"],
                "coordinator": ["--port", "[default 8080]", "[default 127.0.0.1]", "[default 10]"],
                "serve": ["[default 8080]", "[default 127.0.0.1]"],
                "run": ["--out", "default"]}[command]
    for piece in expected:
        assert piece in text, f"{piece!r} not in fedfleet {command} --help"
