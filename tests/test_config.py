"""The configuration file (pcscbridge/config.py): every flag a key, flags win, mistakes named."""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import time
from pathlib import Path

import pytest

from pcscbridge import cli, config
from pcscbridge.config import parse_arguments
from pcscbridge.testing.rawclient import RawClient
from pcscbridge.transports.endpoints import Endpoint
from rig.bridge_processes import PCSCBRIDGE

EXAMPLE = Path(__file__).parents[1] / "contrib" / "pcscbridge.toml"
COMMENTED_KEY = re.compile(r"^# ([a-z-]+ = .*?)(?:\s+#.*)?$")


@pytest.fixture(autouse=True)
def no_machine_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The default files live in the test's folder, not in /etc or the real home."""
    monkeypatch.setattr(config, "SYSTEM_FILE", tmp_path / "etc" / "pcscbridge.toml")
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "home-config"))
    return tmp_path


def parse(*argv: str) -> argparse.Namespace:
    return parse_arguments(cli.build_parser, list(argv))


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_values_are_converted_and_checked_as_flags(tmp_path: Path) -> None:
    file = write(
        tmp_path / "a.toml",
        '[guest]\nlisten = "/run/x.comm"\nlink = "tcp:127.0.0.1:7788"\nreader_slots = 48\n'
        'legacy-readers = ["Yubico*", "-starts-with-a-dash"]\nverbose = 2\n'
        '[host]\nssh = "vm"\naccept-new = true\nssh-config = "/etc/ssh/x"\n',
    )
    guest = parse("guest", "--config", str(file))
    assert guest.listen == "/run/x.comm"
    assert guest.link == Endpoint("tcp", host="127.0.0.1", port=7788)
    assert guest.reader_slots == 48 and guest.verbose == 2
    assert guest.legacy_readers == ["Yubico*", "-starts-with-a-dash"]
    assert guest.config_files == [file]
    host = parse("host", "--config", str(file))  # --ssh is required: the file gives it
    assert host.ssh == "vm" and host.accept_new is True and host.ssh_config == Path("/etc/ssh/x")


def test_flags_win_over_the_file(tmp_path: Path) -> None:
    file = write(
        tmp_path / "a.toml",
        '[guest]\nreader-slots = 48\nlegacy-readers = ["A*", "B*"]\n[host]\nssh = "vm"\n',
    )
    guest = parse("guest", "--config", str(file), "--reader-slots", "20", "--legacy-readers", "Z")
    assert guest.reader_slots == 20
    assert guest.legacy_readers == ["Z"]  # replaced, not added to
    # A flag of the file's option's exclusive group drops the file's option.
    host = parse("host", "--config", str(file), "--connect", "unix:/tmp/link.sock")
    assert host.ssh is None and host.connect == Endpoint("unix", path="/tmp/link.sock")


def test_user_file_wins_over_the_system_file_key_by_key(no_machine_files: Path) -> None:
    write(config.SYSTEM_FILE, '[guest]\nreader-slots = 48\nlisten = "/system.comm"\n')
    write(config.user_file(), '[guest]\nlisten = "/user.comm"\n')
    guest = parse("guest")
    assert guest.listen == "/user.comm" and guest.reader_slots == 48
    assert guest.config_files == [config.SYSTEM_FILE, config.user_file()]
    # --config FILE alone: the default files are not read.
    only = write(no_machine_files / "only.toml", "[guest]\n")
    guest = parse("guest", "--config", str(only))
    assert guest.listen is None and guest.reader_slots == 16


def test_no_files_no_change() -> None:
    assert vars(parse("guest", "--listen", "/x")) == {
        **vars(cli.build_parser().parse_args(["guest", "--listen", "/x"])),
        "config_files": [],
    }


def test_an_option_added_later_is_a_key_without_code_for_it(tmp_path: Path) -> None:
    def with_more_options() -> argparse.ArgumentParser:
        parser = cli.build_parser()
        host = config._subparsers(parser)["host"]
        host.add_argument("--later-file", type=Path, metavar="FILE")
        host.add_argument("--max-contexts", type=int, default=8)
        host.add_argument("--later-list", action="append", default=[])
        return parser

    file = write(
        tmp_path / "a.toml",
        '[host]\nssh = "vm"\nlater-file = "/etc/p.toml"\nmax-contexts = 3\n'
        'later-list = ["a", "b"]\n',
    )
    args = parse_arguments(with_more_options, ["host", "--config", str(file)])
    assert args.later_file == Path("/etc/p.toml") and args.max_contexts == 3
    assert args.later_list == ["a", "b"]


@pytest.mark.parametrize(
    ("text", "said"),
    [
        ("[guest]\nreader-slots = 0\n", "[guest] reader-slots: argument --reader-slots: must be"),
        ("[guest]\nreader-slots = true\n", "[guest] reader-slots: expected a string or a number"),
        ("[host]\nssh-client = 'putty'\n", "invalid choice: 'putty'"),
        ("[host]\nssh = 'a'\nconnect = 'unix:/x'\n", "not allowed with argument"),
        ("[host]\naccept-new = 'yes'\n", "[host] accept-new: expected true or false"),
        ("[host]\nfoo = 1\n", "[host] has no option 'foo' (options: accept-new,"),
        ("[host]\nconfig = 'x'\n", "[host] has no option 'config'"),
        ("[hots]\nssh = 'a'\n", "no command [hots]"),
        ("ssh = 'a'\n", "outside a table"),
        ("[host\n", "not valid TOML"),
        ("[guest]\nlink = 'carrier-pigeon:'\n", "bad endpoint 'carrier-pigeon:'"),
    ],
)
def test_mistakes_are_named_with_their_file_and_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, said: str
) -> None:
    file = write(tmp_path / "bad.toml", text)
    command = "host" if "[host" in text or "ssh" in text else "guest"
    assert cli.main([command, "--config", str(file)]) == 2
    [line] = capsys.readouterr().err.splitlines()
    assert line.startswith(f"pcscbridge: {file}: ") or line.startswith("pcscbridge: [host] of ")
    assert str(file) in line and said in line, line


def test_a_missing_config_file_is_an_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["guest", "--config", str(tmp_path / "nope.toml")]) == 2
    assert "nope.toml: no such file" in capsys.readouterr().err


def test_the_annotated_example_names_only_real_options(tmp_path: Path) -> None:
    # Every `# key = value` line of contrib/pcscbridge.toml, uncommented, is a valid setting.
    lines = EXAMPLE.read_text().splitlines()
    assert lines[0].startswith("# pcscbridge's configuration file")
    tables: dict[str, list[str]] = {}
    table = ""
    for line in lines:
        if line.startswith("["):
            table = line.strip("[]")
        elif match := COMMENTED_KEY.match(line):
            tables.setdefault(table, []).append(match.group(1))
    assert {"guest", "host", "serve", "attach"} <= tables.keys()
    for command, settings in tables.items():
        for setting in settings:  # one at a time: some are alternatives (ssh, connect, link)
            file = write(tmp_path / "one.toml", f"[{command}]\n{setting}\n")
            key = setting.split(" =")[0]
            argv = [command, "--config", str(file)]
            if command == "host" and key not in ("ssh", "connect", "link"):
                argv += ["--link", "stdio"]
            args = parse_arguments(cli.build_parser, argv)
            assert getattr(args, key.replace("-", "_")) is not None, setting


def test_a_guest_process_takes_its_sockets_from_the_file(tmp_path: Path) -> None:
    socket_path = tmp_path / "pcscd.comm"
    file = write(
        tmp_path / "pcscbridge.toml",
        f'[guest]\nlisten = "{socket_path}"\nlink = "unix:{tmp_path / "link.sock"}"\n',
    )
    guest = subprocess.Popen(
        [*PCSCBRIDGE, "guest", "--config", str(file)], stderr=subprocess.PIPE, text=True
    )
    try:
        deadline = time.monotonic() + 10
        while not (socket_path.exists() and (tmp_path / "link.sock").exists()):
            assert guest.poll() is None, guest.communicate()[1]
            assert time.monotonic() < deadline, "the guest never listened"
            time.sleep(0.02)
        with RawClient(str(socket_path)) as client:
            assert client.version().rv == 0
        assert os.stat(tmp_path / "link.sock").st_mode & 0o777 == 0o600
    finally:
        guest.terminate()
        _, errors = guest.communicate(timeout=10)
    assert guest.returncode == 0, errors
