"""``tunnel-agent``: the command line."""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from tunnel_agent import __version__
from tunnel_agent.config import AgentSettings, ConfigError, load_settings
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
    check = commands.add_parser(
        "check", help="validate the configuration and reach each camera port"
    )
    _add_config(check)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "run":
        return _run(args.config)
    if args.command == "check":
        from tunnel_agent.check import run_check

        return run_check(args.config, sys.stdout)
    return 2


def _load(path: Path | None) -> AgentSettings | None:
    try:
        return load_settings(path)
    except ConfigError as exc:
        print(f"tunnel-agent: {exc}", file=sys.stderr)
        return None


def _run(config: Path | None) -> int:
    settings = _load(config)
    if settings is None:
        return EXIT_CONFIG
    configure_logging(settings.log.level, settings.log.format)
    from tunnel_agent.agent import Agent

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await Agent(settings).run(stop)

    asyncio.run(run())
    return 0
