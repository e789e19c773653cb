"""``tunnel-agent devhub`` and ``tunnel-agent devhub add-device NAME``."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path
from typing import TextIO

from tunnel_agent.cloud.devhub.broker import BrokerError
from tunnel_agent.cloud.devhub.hub import DevHub
from tunnel_agent.cloud.devhub.registry import DeviceRegistry, RegistryError
from tunnel_agent.logs import configure_logging


def default_state_dir() -> Path:
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "tunnel-agent" / "devhub"


def add_device(state: Path, device_id: str, address_block: str | None, out: TextIO) -> int:
    try:
        registry = DeviceRegistry(state, address_block)
        device = registry.add(device_id)
    except RegistryError as exc:
        print(f"tunnel-agent devhub: {exc}", file=sys.stderr)
        return 2
    out.write(device.connection_string() + "\n")
    return 0


def run_devhub(state: Path, rest_listen: str, address_block: str | None, out: TextIO) -> int:
    configure_logging("INFO")

    async def main() -> None:
        hub = DevHub(state, rest_listen, address_block)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await hub.start()
        try:
            out.write(
                f"IoT Hub emulator running (state: {state})\n"
                f"  service connection string: {hub.service_connection_string}\n"
                f"  REST API:                  {hub.rest_url}\n"
                f"  CA certificate:            {hub.ca.cert_file}\n"
                f"  devices:                   {', '.join(hub.devices) or 'none yet'}\n"
                "  add one with:              "
                f"tunnel-agent devhub add-device NAME --state {state}\n"
            )
            out.flush()
            await stop.wait()
        finally:
            await hub.stop()

    try:
        asyncio.run(main())
    except (BrokerError, OSError, RegistryError) as exc:
        print(f"tunnel-agent devhub: {exc}", file=sys.stderr)
        return 1
    return 0
