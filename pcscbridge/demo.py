"""`pcscbridge demo`: the whole bridge on temporary paths with simulated readers, and real
clients using it through the guest socket, so a newcomer sees what happens."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile

import trio

from .demo_client import WAITING_FOR_INSERTION, WAITING_FOR_REMOVAL
from .host.backends.sim import SimulatedBackend
from .host.backends.simcard import SimulatedCard
from .testing.inprocess import inprocess_bridge


def run_demo() -> int:
    return trio.run(_demo)


def _say(text: str = "") -> None:
    print(text, flush=True)


async def _demo() -> int:
    with tempfile.TemporaryDirectory(prefix="pcscbridge-demo-") as folder:
        socket_path = os.path.join(folder, "pcscd.comm")
        backend = SimulatedBackend.with_demo_readers()
        _say("pcscbridge demo")
        _say(f"  host side : simulated readers {backend.list_readers(backend.establish_context())}")
        _say(f"  guest side: a pcscd impersonator on {socket_path}")
        _say("  link      : the bridge's msgpack link over a local socket pair")
        _say()
        env = {**os.environ, "PCSCLITE_CSOCK_NAME": socket_path}
        async with inprocess_bridge(backend, socket_path) as bridge:
            if shutil.which("pcsc_scan"):
                _say(f"$ PCSCLITE_CSOCK_NAME={socket_path} pcsc_scan -r")
                result = await trio.run_process(
                    ["pcsc_scan", "-r"], env=env, capture_stdout=True, check=False
                )
                for line in result.stdout.decode(errors="replace").splitlines():
                    _say(f"  {line}")
                _say()
            _say(f"$ PCSCLITE_CSOCK_NAME={socket_path} python -m pcscbridge.demo_client")
            code = await _run_client(env, backend)
            bridge.nursery.cancel_scope.cancel()
        _say()
        if code == 0:
            _say(
                "Every call above went through the guest server; card calls crossed the link to "
                "the host agent, reader states were answered by the guest from its mirror."
            )
        else:
            _say(f"the demo client failed (exit status {code})")
        return code


async def _run_client(env: dict[str, str], backend: SimulatedBackend) -> int:
    reader = backend.list_readers(backend.establish_context())[0]
    async with trio.open_nursery() as nursery:
        process = await nursery.start(
            lambda task_status=trio.TASK_STATUS_IGNORED: trio.run_process(
                [sys.executable, "-m", "pcscbridge.demo_client"],
                env=env,
                stdout=subprocess.PIPE,
                check=False,
                task_status=task_status,
            )
        )
        buffer = b""
        async for chunk in process.stdout:
            buffer += chunk
            *lines, buffer = buffer.split(b"\n")
            for raw in lines:
                line = raw.decode(errors="replace")
                _say(line)
                if WAITING_FOR_REMOVAL in line:
                    _say(f"  [demo] removing the card from {reader!r} on the host")
                    await trio.to_thread.run_sync(backend.remove_card, reader)
                elif WAITING_FOR_INSERTION in line:
                    _say(f"  [demo] inserting a card into {reader!r} on the host")
                    await trio.to_thread.run_sync(
                        backend.insert_card, reader, SimulatedCard(label="demo card 2")
                    )
        await process.wait()
    return process.returncode
