"""The configuration file: every option a flag sets, in TOML, one table per command; flags win.

    [guest]
    listen = "/run/pcscd/pcscd.comm"
    legacy-readers = ["Yubico*", "*Nitrokey*"]

    [host]
    ssh = "vm"
    ssh-client = "openssh"

Files: `--config FILE` alone, else /etc/pcscbridge/pcscbridge.toml and then
$XDG_CONFIG_HOME/pcscbridge/pcscbridge.toml (~/.config/...), a key in the user's file winning
over the same key in the system's. A missing default file is no error.

Keys are a command's long option names without the dashes (`reader-slots`, or `reader_slots`);
a value is what the flag takes: a string or a number; true for a switch (false: not given); a
count for `verbose`; an array for a repeatable option. Values pass the same checks as on the
command line. A flag given on the command line wins over the file, also over the other
options of its mutually exclusive group (`--connect` on the command line drops `ssh` from the
file).

Nothing here names an option: the keys are the parser's own options, read from it, so an option
added to a command is a configuration key at once.
"""

from __future__ import annotations

import argparse
import os
import tomllib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .errors import SetupError

SYSTEM_FILE = Path("/etc/pcscbridge/pcscbridge.toml")
NOT_KEYS = {"config", "help"}  # options that make no sense in the file


class ConfigError(SetupError):
    """A configuration file that cannot be used; the message names the file and the key."""

    exit_code = 2


def user_file() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "pcscbridge" / "pcscbridge.toml"


def default_files() -> list[Path]:
    return [SYSTEM_FILE, user_file()]


def parse_arguments(
    build_parser: Callable[[], argparse.ArgumentParser], argv: Sequence[str] | None
) -> argparse.Namespace:
    """Parse `argv` with the parser `build_parser` makes, its defaults taken from the config
    files first. The namespace's `config_files` lists the files read."""
    argv = list(argv) if argv is not None else _sys_argv()
    given = _quiet_parse(build_parser(), argv)
    command = getattr(given, "command", None) if given is not None else None
    if command is None:  # --help, --version or a mistake: the real parse says what
        return build_parser().parse_args(argv)
    explicit = getattr(given, "config", None)
    files = [Path(explicit)] if explicit else default_files()
    parser = build_parser()
    commands = _subparsers(parser)
    settings, read = _read_files(files, required=bool(explicit), commands=list(commands))
    sub = commands[command]
    defaults = _defaults_for(build_parser, command, settings.get(command, {}), read)
    for group in _exclusive_groups(sub):
        dests = {action.dest for action in group}
        if dests & vars(given).keys():  # a flag given here drops its rivals from the file
            defaults = {dest: value for dest, value in defaults.items() if dest not in dests}
    defaults = {dest: value for dest, value in defaults.items() if dest not in vars(given)}
    _relax_required(sub, set(defaults))
    sub.set_defaults(**defaults)
    args = parser.parse_args(argv)
    args.config_files = read
    return args


def check_files(
    build_parser: Callable[[], argparse.ArgumentParser], files: list[Path]
) -> list[str]:
    """Every table of the files checked against its command: what is wrong (nothing: [])."""
    commands = list(_subparsers(build_parser()))
    try:
        settings, read = _read_files(files, required=True, commands=commands)
    except ConfigError as exc:
        return [str(exc)]
    problems = []
    for command, table in settings.items():
        try:
            _defaults_for(build_parser, command, table, read)
        except ConfigError as exc:
            problems.append(str(exc))
    return problems


def _sys_argv() -> list[str]:
    import sys

    return sys.argv[1:]


# --- reading --------------------------------------------------------------------------------


def _read_files(
    files: list[Path], *, required: bool, commands: list[str]
) -> tuple[dict[str, dict[str, tuple[Any, Path]]], list[Path]]:
    """{command: {key: (value, file)}}, later files winning per key; and the files read."""
    settings: dict[str, dict[str, tuple[Any, Path]]] = {}
    read = []
    for path in files:
        try:
            with path.open("rb") as file:
                data = tomllib.load(file)
        except FileNotFoundError:
            if required:
                raise ConfigError(f"{path}: no such file") from None
            continue
        except PermissionError:
            if required:
                raise ConfigError(f"{path}: permission denied") from None
            continue  # another user's default file (HOME kept by su or setpriv)
        except OSError as exc:
            raise ConfigError(f"{path}: {exc.strerror or exc}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: not valid TOML: {exc}") from None
        read.append(path)
        for command, table in data.items():
            if not isinstance(table, dict):
                raise ConfigError(
                    f"{path}: {command} = ... outside a table; options go in a table named "
                    f"after their command: [guest], [host], ..."
                )
            if command not in commands:
                raise ConfigError(f"{path}: no command [{command}] (commands: {commands})")
            for key, value in table.items():
                settings.setdefault(command, {})[key.replace("_", "-")] = (value, path)
    return settings, read


def _defaults_for(
    build_parser: Callable[[], argparse.ArgumentParser],
    command: str,
    settings: dict[str, tuple[Any, Path]],
    read: list[Path],
) -> dict[str, Any]:
    """The command's options the files set, converted and checked as flags would be."""
    sub = _subparsers(build_parser())[command]
    keys = {key: action for action in _options(sub) for key in _keys(action)}
    tokens: list[str] = []
    for key, (value, path) in settings.items():
        action = keys.get(key)
        if action is None or key in NOT_KEYS:
            known = ", ".join(sorted(k for k in keys if k not in NOT_KEYS))
            raise ConfigError(f"{path}: [{command}] has no option {key!r} (options: {known})")
        flag = f"--{key}"
        key_tokens = _tokens(flag, action, value, f"{path}: [{command}] {key}")
        # Alone first, so a bad value is blamed on its own key and file.
        _quiet_parse(build_parser(), [command, *key_tokens], f"{path}: [{command}] {key}")
        tokens += key_tokens
    parsed = _quiet_parse(build_parser(), [command, *tokens], f"[{command}] of {_files(read)}")
    assert parsed is not None
    return {dest: value for dest, value in vars(parsed).items() if dest != "command"}


def _files(read: list[Path]) -> str:
    return ", ".join(str(path) for path in read)


def _tokens(flag: str, action: argparse.Action, value: Any, where: str) -> list[str]:
    """The command-line words that say what the file says."""
    if action.nargs == 0:  # a switch (true/false) or a counter (a number)
        if isinstance(value, bool):
            return [flag] if value else []
        if isinstance(value, int) and value >= 0:
            return [flag] * value
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    items = value if isinstance(value, list) else [value]
    for item in items:
        if isinstance(item, (dict, list, bool)):
            raise ConfigError(f"{where}: expected a string or a number, got {item!r}")
    words = [str(item) for item in items]
    if action.nargs in (None, "?"):
        return [f"{flag}={word}" for word in words]  # `=`: a value may start with a dash
    return [flag, *words]


# --- the parser's own options ---------------------------------------------------------------


class _QuietParseError(Exception):
    pass


def _quiet_parse(
    parser: argparse.ArgumentParser, argv: list[str], where: str | None = None
) -> argparse.Namespace | None:
    """What `argv` says explicitly (no defaults, nothing required). None when argparse would
    print something and exit (help, version, a mistake): unless `where` is given, then the
    mistake is a ConfigError there."""
    for each in _all_parsers(parser):
        for action in each._actions:
            if not isinstance(action, (argparse._HelpAction, argparse._VersionAction)):
                action.default = argparse.SUPPRESS
        _relax_required(each, None)
        each.exit = _refuse_exit  # type: ignore[method-assign]
        each.error = _refuse_error  # type: ignore[method-assign]
        each._print_message = lambda *args, **kwargs: None  # type: ignore[method-assign]
    try:
        return parser.parse_args(argv)
    except _QuietParseError as exc:
        if where is None:
            return None
        raise ConfigError(f"{where}: {exc}") from None


def _refuse_exit(status: int = 0, message: str | None = None) -> None:
    raise _QuietParseError(message or "")


def _refuse_error(message: str) -> None:
    raise _QuietParseError(message)


def _all_parsers(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    return [parser, *_subparsers(parser).values()]


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _options(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [
        action
        for action in parser._actions
        if action.option_strings
        and not isinstance(action, (argparse._HelpAction, argparse._VersionAction))
    ]


def _keys(action: argparse.Action) -> list[str]:
    return [option[2:] for option in action.option_strings if option.startswith("--")]


def _exclusive_groups(parser: argparse.ArgumentParser) -> list[list[argparse.Action]]:
    return [group._group_actions for group in parser._mutually_exclusive_groups]


def _relax_required(parser: argparse.ArgumentParser, dests: set[str] | None) -> None:
    """Options (and groups) the config satisfies are not required on the command line
    (`dests` None: none is)."""
    for action in parser._actions:
        if dests is None or action.dest in dests:
            action.required = False
    for group in parser._mutually_exclusive_groups:
        if dests is None or any(action.dest in dests for action in group._group_actions):
            group.required = False
