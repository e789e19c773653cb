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

    connect = commands.add_parser(
        "connect", help="a local port that leads to a relay session (for the consumer's machine)"
    )
    connect.add_argument("connect_url", help="the session's connectUrl (wss://.../connect)")
    connect.add_argument(
        "--listen", default="127.0.0.1:8554", help="local address (default 127.0.0.1:8554)"
    )
    connect.add_argument(
        "--ca-file", type=Path, help="CA certificates to trust besides the system's"
    )
    connect.add_argument(
        "--token-file",
        type=Path,
        help="file with the session token (default: the TUNNEL_AGENT_TOKEN environment variable)",
    )
    connect.add_argument(
        "--allow-insecure-ws",
        action="store_true",
        help="accept a ws:// URL (development only: the token crosses in clear)",
    )
    connect.add_argument("--log-format", choices=["text", "json"], default="text")

    devhub = commands.add_parser("devhub", help="run the local IoT Hub emulator")
    devhub.add_argument(
        "--state", type=Path, help="state folder (default: ~/.local/state/tunnel-agent/devhub)"
    )
    devhub.add_argument(
        "--rest", default="127.0.0.1:8444", help="REST API address; its host is the hub's name"
    )
    devhub.add_argument(
        "--mqtt-port", type=int, default=8883, help="device MQTT (TLS) port on that host"
    )
    devhub.add_argument(
        "--websocket-port", type=int, help="also serve MQTT over WebSockets (the SDKs use 443)"
    )
    devhub.add_argument("--dps", metavar="HOST[:PORT]", help="also serve DPS (port 8883)")
    devhub_commands = devhub.add_subparsers(dest="devhub_command")
    add = devhub_commands.add_parser(
        "add-device", help="register a device, print its connection string"
    )
    add.add_argument("name")
    add.add_argument("--x509", action="store_true", help="a certificate from the devhub CA")
    show = devhub_commands.add_parser(
        "connection-string", help="print a registered device's connection string"
    )
    show.add_argument("name")
    enroll = devhub_commands.add_parser("add-enrollment", help="add a DPS enrollment")
    enroll.add_argument("name", help="registration id, or the group's name with --group")
    enroll.add_argument("--group", action="store_true", help="a group enrollment")
    enroll.add_argument("--device-id", help="device id on the hub (default: registration id)")
    enroll.add_argument("--key", help="symmetric key, base64 (default: a new one)")
    enroll.add_argument("--x509", action="store_true", help="a certificate from the devhub CA")
    enroll.add_argument("--cert", type=Path, help="attest with this certificate (PEM)")
    for sub in (add, show, enroll):
        sub.add_argument("--state", type=Path, dest="sub_state", help="state folder, as for devhub")

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
    if args.command == "connect":
        from tunnel_agent.consumer.cli import run_connect

        return run_connect(
            args.connect_url,
            args.listen,
            ca_file=args.ca_file,
            token_file=args.token_file,
            allow_insecure_ws=args.allow_insecure_ws,
            log_format=args.log_format,
        )
    if args.command == "devhub":
        return _devhub(args)
    if args.command == "snapshot":
        return _snapshot(args.config, args.camera, args.output)
    if args.command == "demo":
        try:
            from tunnel_agent.demo import run_demo
        except ModuleNotFoundError as exc:
            return _development_tool_missing("demo", exc)

        return run_demo(seconds=args.seconds, keep_running=args.keep_running, output=args.output)
    return 2


def _devhub(args: argparse.Namespace) -> int:
    try:
        from tunnel_agent.cloud.devhub import cli as devhub
    except ModuleNotFoundError as exc:
        return _development_tool_missing("devhub", exc)

    state = getattr(args, "sub_state", None) or args.state or devhub.default_state_dir()
    if args.devhub_command == "add-device":
        return devhub.add_device(state, args.name, args.x509, sys.stdout)
    if args.devhub_command == "connection-string":
        return devhub.connection_string(state, args.name, sys.stdout)
    if args.devhub_command == "add-enrollment":
        return devhub.add_enrollment(
            state,
            args.name,
            group=args.group,
            device_id=args.device_id,
            key=args.key,
            x509=args.x509,
            cert_file=args.cert,
            out=sys.stdout,
        )
    options = devhub.HubOptions(args.rest, args.mqtt_port, args.websocket_port, args.dps)
    return devhub.run_devhub(state, options, sys.stdout)


DEVELOPMENT_MODULES = (
    "tunnel_agent.cloud.devhub",
    "tunnel_agent.demo",
    "tunnel_agent.ports",
    "tunnel_agent.sim",
)


def _development_tool_missing(command: str, exc: ModuleNotFoundError) -> int:
    """The devhub and the demo run from a source checkout with the [devhub] extra: the wheel and
    the image carry only the agent and the relay (pyproject.toml, wheel-exclude)."""
    missing = exc.name or ""
    if missing.startswith(DEVELOPMENT_MODULES):
        reason = (
            "the IoT Hub emulator and the demo are not part of this installation (the wheel and "
            "the image carry the agent and the relay only); run them from a source checkout of "
            "tunnel-agent: bash scripts/demo.sh, or bash scripts/setup-venv.sh demo and then "
            f".venv/bin/python -m tunnel_agent {command}"
        )
    elif missing.split(".")[0] == "tunnel_agent":
        raise exc
    else:
        reason = (
            f"needs the [devhub] extra ({missing} is missing): bash scripts/setup-venv.sh demo "
            "(or: bash scripts/uv.sh sync --extra devhub)"
        )
    print(f"tunnel-agent {command}: {reason}", file=sys.stderr)
    return 1


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
    from tunnel_agent import malloc

    malloc.tune()  # before any thread starts: arenas that exist stay
    settings = _load(config)
    if settings is None:
        return EXIT_CONFIG
    chosen: Literal["text", "json"] = settings.log.format
    if log_format in ("text", "json"):
        chosen = "json" if log_format == "json" else "text"
    configure_logging(settings.log.level, chosen)
    from tunnel_agent.agent import Agent, exit_after

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()

        def on_signal() -> None:
            if not stop.is_set():
                stop.set()
                exit_after(settings.shutdown_timeout)

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, on_signal)
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
