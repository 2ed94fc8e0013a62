"""A stand-in for Qubes' qrexec, for tests: `qrexec-client-vm TARGET SERVICE` in one process.

Real qrexec runs in the calling qube as `qrexec-client-vm sys-usb pcscbridge.Link`, asks dom0's
policy, and runs the service program (/etc/qubes-rpc/pcscbridge.Link) in the target qube with
QREXEC_REMOTE_DOMAIN set to the caller's name, its stdin and stdout joined to the caller's
through qrexec's own relays. This stand-in does what the two ends see of it:

    python -m rig.qrexec --source work [--deny] [--delay S] [--env K=V] [--service-log F]
        [--pid-file F] -- SERVICE_ARGV...

runs SERVICE_ARGV with QREXEC_REMOTE_DOMAIN=work, relays its stdin and stdout through this
process (two copying threads, as qrexec's relays do), and exits with the service's exit status
once the service's output has ended. `--deny` is a policy refusal: nothing runs, "Request
refused" on stderr, exit 126 (qrexec-client-vm's status for it). `--delay` is the time a person
takes to answer an `ask` dialog.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import threading
import time

EXIT_REFUSED = 126


def _copy(source: int, sink: int) -> None:
    """Copy until EOF, then close the sink (the peer sees the end of the stream)."""
    try:
        while data := os.read(source, 65536):
            view = memoryview(data)
            while view:
                view = view[os.write(sink, view) :]
    except OSError:
        pass
    finally:
        os.close(sink)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="qrexec-stand-in")
    parser.add_argument("--source", required=True, help="the calling qube's name")
    parser.add_argument("--deny", action="store_true", help="the policy refuses the call")
    parser.add_argument("--delay", type=float, default=0.0, help="seconds before the answer")
    parser.add_argument("--env", action="append", default=[], metavar="NAME=VALUE")
    parser.add_argument("--service-log", help="the service's stderr (default: ours)")
    parser.add_argument("--pid-file", help="write the service's pid here")
    parser.add_argument("service", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    service = args.service[1:] if args.service[:1] == ["--"] else args.service
    time.sleep(args.delay)
    if args.deny or not service:
        print("Request refused", file=sys.stderr)
        return EXIT_REFUSED
    env = {**os.environ, "QREXEC_REMOTE_DOMAIN": args.source}
    env.update(item.split("=", 1) for item in args.env)
    log = open(args.service_log, "ab") if args.service_log else None  # noqa: SIM115
    process = subprocess.Popen(
        service, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, env=env
    )
    assert process.stdin is not None and process.stdout is not None
    if args.pid_file:
        with open(args.pid_file, "w") as pid_file:
            pid_file.write(str(process.pid))
    to_service = threading.Thread(
        target=_copy, args=(0, os.dup(process.stdin.fileno())), daemon=True
    )
    process.stdin.close()
    to_service.start()
    _copy(process.stdout.fileno(), os.dup(1))  # until the service's output ends
    os.close(1)
    status = process.wait()
    return status if status >= 0 else 128 - status


if __name__ == "__main__":
    sys.exit(main())
