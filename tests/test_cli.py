"""The ``novacron`` dispatcher: every subcommand is documented and wired."""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from collections.abc import Iterator

import pytest

from novacron import cli


def _walk(
    parser: argparse.ArgumentParser, path: tuple[str, ...] = ()
) -> Iterator[tuple[tuple[str, ...], argparse.ArgumentParser]]:
    """Yield every parser of the tree with its command path, the root first."""
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _walk(sub, (*path, name))


def _subparser_actions(
    parser: argparse.ArgumentParser,
) -> list[argparse._SubParsersAction[argparse.ArgumentParser]]:
    return [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]


PARSERS = list(_walk(cli.build_parser()))
IDS = [" ".join(path) or "<root>" for path, _ in PARSERS]


def test_command_modules_sorted_and_unique() -> None:
    assert list(cli._COMMAND_MODULES) == sorted(set(cli._COMMAND_MODULES))


def test_commands_map_to_their_modules() -> None:
    for module in cli._COMMAND_MODULES:
        mine = {name for name, home in cli._COMMANDS.items() if home == module}
        (action,) = _subparser_actions(cli.build_parser((module,)))
        assert set(action.choices) == mine, module
    assert set(cli._COMMANDS.values()) == set(cli._COMMAND_MODULES)


@pytest.mark.parametrize(
    ("argv", "modules"),
    [
        (["agent", "run", "--config", "x.yaml"], ("edge_agent._cli",)),
        (["--log-level", "DEBUG", "--log-json", "agent", "run"], ("edge_agent._cli",)),
        (["--log-level=WARNING", "hub", "serve"], ("cloud_hub._hub_cli",)),
        (["rollout", "pause", "web"], ("cloud_hub._client_cli",)),
        ([], cli._COMMAND_MODULES),
        (["-h"], cli._COMMAND_MODULES),
        (["agent", "--help"], cli._COMMAND_MODULES),
        (["nosuch"], cli._COMMAND_MODULES),
        (["--log-level", "LOUD", "agent"], cli._COMMAND_MODULES),
        (["--log-level"], cli._COMMAND_MODULES),
    ],
)
def test_a_command_imports_only_its_module(argv: list[str], modules: tuple[str, ...]) -> None:
    assert tuple(cli._command_modules(argv)) == modules


def test_profiles_registered() -> None:
    assert ("profiles", "list") in {path for path, _ in PARSERS}


@pytest.mark.parametrize(("path", "parser"), PARSERS, ids=IDS)
def test_every_subcommand_has_help(path: tuple[str, ...], parser: argparse.ArgumentParser) -> None:
    for sub_action in _subparser_actions(parser):
        # argparse records a subcommand in _choices_actions only when help= was given.
        helps = {a.dest: a.help for a in sub_action._choices_actions}
        for name, sub in sub_action.choices.items():
            names = [n for n, p in sub_action.choices.items() if p is sub]  # with aliases
            assert any(helps.get(n) for n in names), (
                f"subcommand {' '.join((*path, name))!r} has no help text"
            )


@pytest.mark.parametrize(("path", "parser"), PARSERS, ids=IDS)
def test_every_argument_has_help(path: tuple[str, ...], parser: argparse.ArgumentParser) -> None:
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction | argparse._SubParsersAction):
            continue
        name = "/".join(action.option_strings) or action.dest
        assert action.help, f"{' '.join(path) or 'novacron'}: argument {name!r} has no help text"


@pytest.mark.parametrize(("path", "parser"), PARSERS, ids=IDS)
def test_every_command_is_wired(path: tuple[str, ...], parser: argparse.ArgumentParser) -> None:
    """A leaf has a handler; a group requires a subcommand (else args.func is missing)."""
    groups = _subparser_actions(parser)
    if groups:
        assert all(g.required for g in groups), f"{' '.join(path)!r}: subcommand not required"
    else:
        assert callable(parser.get_default("func")), f"{' '.join(path)!r} has no handler"


@pytest.mark.parametrize(("path", "parser"), PARSERS[1:], ids=IDS[1:])
def test_every_subcommand_help_renders(
    path: tuple[str, ...], parser: argparse.ArgumentParser
) -> None:
    assert parser.format_help().strip()


def test_help_in_subprocess() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "novacron", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "usage: novacron" in result.stdout
    assert "profiles" in result.stdout


def test_profiles_cli_import_stays_light() -> None:
    """Registering ``profiles`` imports neither pydantic nor PyYAML (handlers do)."""
    code = (
        "import sys, argparse, firmware_profiles._cli as m; "
        "m.register(argparse.ArgumentParser().add_subparsers()); "
        "print(sorted(n for n in ('pydantic', 'yaml') if n in sys.modules))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_no_command_is_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main([])
    assert info.value.code == 2
    assert "COMMAND" in capsys.readouterr().err


def test_agent_run_parses_without_importing_shutil() -> None:
    # argparse sizes its formatters with shutil (which brings bz2 and lzma);
    # the agent would keep them for its lifetime. A clean interpreter, as the
    # agent starts.
    code = (
        "import sys\n"
        "from novacron.cli import build_parser, _command_modules\n"
        "argv = ['agent', 'run', '--config', 'x.yaml']\n"
        "args = build_parser(_command_modules(argv)).parse_args(argv)\n"
        "print(args.config, 'shutil' in sys.modules)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert out.stdout.split() == ["x.yaml", "False"]


@pytest.mark.parametrize("columns", [None, "57", "0", "wide"])
def test_help_is_as_wide_as_shutil_would_make_it(
    columns: str | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    if columns is None:
        monkeypatch.delenv("COLUMNS", raising=False)
    else:
        monkeypatch.setenv("COLUMNS", columns)
    assert cli._terminal_columns() == shutil.get_terminal_size().columns
    stock, ours = argparse.HelpFormatter("novacron"), cli._HelpFormatter("novacron")
    assert (ours._width, ours._max_help_position) == (stock._width, stock._max_help_position)


@pytest.mark.parametrize(("path", "parser"), PARSERS, ids=IDS)
def test_every_parser_uses_the_shutil_free_formatter(
    path: tuple[str, ...], parser: argparse.ArgumentParser
) -> None:
    assert isinstance(parser._get_formatter(), cli._HelpFormatter), path
