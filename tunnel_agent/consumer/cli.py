"""``tunnel-agent connect CONNECT_URL --listen HOST:PORT``: check the session, then listen.

Exit status: 0 after SIGINT or SIGTERM, 1 when the relay refuses the session (401, 403, 404,
an expired or revoked session) or cannot be reached, or the port cannot be bound, 2 for wrong
arguments (no token, a malformed URL).
"""

from __future__ import annotations

import asyncio
import os
import signal
import ssl
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Literal, TextIO

from tunnel_agent import __version__
from tunnel_agent.config.base import split_host_port
from tunnel_agent.config.proxy import InvalidProxy
from tunnel_agent.consumer.local_proxy import ConnectOptions, LocalProxy
from tunnel_agent.consumer.session_check import check_session
from tunnel_agent.consumer.target import ConnectError, find_token, parse_connect_url
from tunnel_agent.logs import SECRETS, configure_logging
from tunnel_agent.tunnel.connect import tls_context
from tunnel_agent.tunnel.proxy_choice import choose_proxy

HANDSHAKE_TIMEOUT_S = 15.0
EXIT_REFUSED = 1
EXIT_USAGE = 2


def run_connect(
    url: str,
    listen: str,
    *,
    ca_file: Path | None,
    token_file: Path | None,
    allow_insecure_ws: bool = False,
    log_format: Literal["text", "json"] = "text",
    environ: Mapping[str, str] = os.environ,
    out: TextIO = sys.stdout,
) -> int:
    configure_logging("INFO", log_format)
    try:
        token = find_token(token_file, environ)
        target = parse_connect_url(url, token, allow_insecure=allow_insecure_ws)
        try:
            split_host_port(listen)
        except ValueError as exc:
            raise ConnectError(f"--listen: {exc}") from None
        try:
            proxy = choose_proxy("wss" if target.secure else "ws", target.host, None, environ)
        except InvalidProxy as exc:
            raise ConnectError(f"proxy setting in the environment: {exc}") from None
        try:
            tls = tls_context(ca_file)
        except (OSError, ssl.SSLError) as exc:
            raise ConnectError(f"--ca-file {ca_file}: {exc}") from None
    except ConnectError as exc:
        print(f"tunnel-agent connect: {exc}", file=sys.stderr)
        return EXIT_USAGE
    SECRETS.add(token)
    options = ConnectOptions(
        target=target,
        tls=tls,
        user_agent=f"tunnel-agent/{__version__} connect",
        proxy=proxy,
        handshake_timeout_s=HANDSHAKE_TIMEOUT_S,
    )
    return asyncio.run(_serve(options, listen, out))


async def _serve(options: ConnectOptions, listen: str, out: TextIO) -> int:
    target = options.target
    try:
        session = await check_session(
            target, options.proxy, options.tls, options.user_agent, HANDSHAKE_TIMEOUT_S
        )
    except ConnectError as exc:
        print(f"tunnel-agent connect: {exc}", file=sys.stderr)
        return EXIT_REFUSED
    proxy = LocalProxy(options, out)
    try:
        host, port = await proxy.start(listen)
    except OSError as exc:
        print(f"tunnel-agent connect: cannot listen on {listen}: {exc.strerror}", file=sys.stderr)
        return EXIT_REFUSED
    via = f" via proxy {options.proxy.display}" if options.proxy is not None else ""
    shown = f"[{host}]" if ":" in host else host
    print(
        f"listening on {shown}:{port} for session {target.session_id} (device"
        f" {session.device_id}, port {session.local_port}, until {session.expires_at}){via}",
        file=out,
        flush=True,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await proxy.close()
    return 0
