"""`pcscbridge doctor`: what works and what does not, on a host or in a guest, each finding with
its fix. Exit status 1 when something is broken (the PC/SC socket the clients here use is
missing, stale or refused; a client library that the server does not speak; a bad config
file; pcscd.socket and the guest's socket both active), else 0: a machine without systemd, or
with no guest server configured, is not broken.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from .checks import (
    Finding,
    check_config,
    check_host_role,
    check_libraries,
    check_link,
    check_pcsc_socket,
    check_systemd,
)

LEVELS = {"ok": "ok  ", "info": "info", "warn": "warn", "fail": "FAIL"}


def run_doctor(
    args: argparse.Namespace, build_parser: Callable[[], argparse.ArgumentParser]
) -> int:
    findings: list[Finding] = []
    findings += check_config(args, build_parser)
    server, socket_findings = check_pcsc_socket()
    findings += socket_findings
    findings += check_libraries(server, args.libpcsclite)
    findings += check_link(server)
    findings += check_host_role()
    findings += check_systemd()
    broken = [finding for finding in findings if finding.level == "fail"]
    for finding in findings:
        print(f"{LEVELS[finding.level]}  {finding.what}")
        if finding.fix:
            print(f"      fix: {finding.fix}")
    if broken:
        print(f"{len(broken)} problem{'s' * (len(broken) != 1)} found.")
    else:
        print("Nothing is broken.")
    sys.stdout.flush()
    return 1 if broken else 0
