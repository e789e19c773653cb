"""``tunnel-agent``: the command line."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from tunnel_agent import __version__
from tunnel_agent.config.loading import ConfigError, load_settings
from tunnel_agent.config.settings import AgentSettings
from tunnel_agent.logs import configure_logging

EXIT_CONFIG = 2


def _add_config(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-c", "--config", type=Path, help="TOML configuration file")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tunnel-agent",
        description="Reach RTSP cameras behind a firewall through WebSocket tunnels.",
    )
    parser.add_argument("--version", action="version", version=f"tunnel-agent {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="run the device agent")
    _add_config(run)
    run.add_argument("--log-format", choices=["text", "json"], help="overrides [log] format")

    status = commands.add_parser("status", help="show a running agent's tunnels and media tasks")
    _add_config(status)
    status.add_argument("--url", help="the agent's observability URL (default: from the config)")
    status.add_argument("--json", action="store_true", help="print the raw JSON")
    check = commands.add_parser(
        "check", help="validate the configuration and reach each camera port"
    )
    _add_config(check)

    relay = commands.add_parser("relay", help="run the cloud-side relay")
    _add_config(relay)

    devhub = commands.add_parser("devhub", help="run the local IoT Hub emulator")
    devhub.add_argument(
        "--state", type=Path, help="state folder (default: ~/.local/state/tunnel-agent/devhub)"
    )
    devhub.add_argument("--rest", default="127.0.0.1:8444", help="REST API address")
    devhub.add_argument(
        "--address-block", help="loopback network for device brokers (default 127.77.0.0/24)"
    )
    devhub_commands = devhub.add_subparsers(dest="devhub_command")
    add = devhub_commands.add_parser(
        "add-device", help="register a device, print its connection string"
    )
    add.add_argument("name")
    add.add_argument("--state", type=Path, dest="add_state", help="state folder, as for devhub")

    snapshot = commands.add_parser("snapshot", help="take one image from a configured camera")
    _add_config(snapshot)
    snapshot.add_argument("--camera", required=True, help="camera name from the configuration")
    snapshot.add_argument(
        "-o", "--output", type=Path, required=True, help="image file (.jpg .png .bmp .tiff)"
    )

    demo = commands.add_parser("demo", help="run camera, agent, emulator and relay here")
    demo.add_argument("--seconds", type=float, default=10.0, help="how long to play (default 10)")
    demo.add_argument("--keep-running", action="store_true", help="leave it all up until Ctrl-C")
    demo.add_argument("--output", type=Path, help="folder for the snapshot and logs")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "run":
        return _run(args.config, args.log_format)
    if args.command == "status":
        return _status(args.config, args.url, args.json)
    if args.command == "check":
        from tunnel_agent.check import run_check

        return run_check(args.config, sys.stdout)
    if args.command == "relay":
        return _relay(args.config)
    if args.command == "devhub":
        from tunnel_agent.cloud.devhub.cli import add_device, default_state_dir, run_devhub

        state = getattr(args, "add_state", None) or args.state or default_state_dir()
        if args.devhub_command == "add-device":
            return add_device(state, args.name, args.address_block, sys.stdout)
        return run_devhub(state, args.rest, args.address_block, sys.stdout)
    if args.command == "snapshot":
        return _snapshot(args.config, args.camera, args.output)
    if args.command == "demo":
        from tunnel_agent.demo import run_demo

        return run_demo(seconds=args.seconds, keep_running=args.keep_running, output=args.output)
    return 2


def _load(path: Path | None) -> AgentSettings | None:
    try:
        return load_settings(path)
    except ConfigError as exc:
        print(f"tunnel-agent: {exc}", file=sys.stderr)
        return None


def _relay(config: Path | None) -> int:
    from tunnel_agent.cloud.relay.runner import run_relay
    from tunnel_agent.cloud.relay.settings import RelaySettings
    from tunnel_agent.config.loading import load_any

    try:
        settings = load_any(RelaySettings, config, RELAY_PATH_KEYS)
    except ConfigError as exc:
        print(f"tunnel-agent: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    configure_logging(settings.log.level, settings.log.format)

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await run_relay(settings, stop)

    try:
        asyncio.run(run())
    except OSError as exc:
        print(f"tunnel-agent relay: {exc}", file=sys.stderr)
        return 1
    return 0


RELAY_PATH_KEYS = (("relay", "cert_file"), ("relay", "key_file"), ("iothub", "ca_file"))


def _snapshot(config: Path | None, camera_name: str, output: Path) -> int:
    from tunnel_agent.logs import redact_text
    from tunnel_agent.media.oneshot import SnapshotFailed, take_snapshot

    settings = _load(config)
    if settings is None:
        return EXIT_CONFIG
    camera = next((c for c in settings.cameras if c.name == camera_name), None)
    if camera is None:
        names = ", ".join(c.name for c in settings.cameras) or "none"
        print(
            f"tunnel-agent snapshot: no camera {camera_name!r} (configured: {names})",
            file=sys.stderr,
        )
        return EXIT_CONFIG
    try:
        width, height = take_snapshot(camera, settings.media, output)
    except (SnapshotFailed, OSError, ValueError) as exc:
        message = redact_text(f"{type(exc).__name__}: {exc}")
        print(f"tunnel-agent snapshot: {message}", file=sys.stderr)
        return 1
    print(f"{output} ({width}x{height})")
    return 0


def _status(config: Path | None, url: str | None, as_json: bool) -> int:
    from tunnel_agent.observability.status_cli import run_status

    if url is None:
        settings = _load(config)
        if settings is None:
            return EXIT_CONFIG
        url = f"http://{settings.observability.listen}"
    return run_status(url, sys.stdout, as_json)


def _run(config: Path | None, log_format: str | None = None) -> int:
    settings = _load(config)
    if settings is None:
        return EXIT_CONFIG
    chosen: Literal["text", "json"] = settings.log.format
    if log_format in ("text", "json"):
        chosen = "json" if log_format == "json" else "text"
    configure_logging(settings.log.level, chosen)
    from tunnel_agent.agent import Agent

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await Agent(settings).run(stop)
        _exit_at_once(0)

    asyncio.run(run())
    return 0


def _exit_at_once(code: int) -> None:
    """Exit now that the agent has stopped in order, without waiting for threads.

    The IoT SDK's worker threads are not daemons and can sit in a blocking TLS handshake for as
    long as the MQTT keep-alive (a minute by default): the interpreter would wait for them.
    """
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
