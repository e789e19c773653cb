"""The User-Agent that lets the cloud side tell agents, platforms and cameras apart."""

from __future__ import annotations

import platform
import re
from dataclasses import dataclass

_NOT_TOKEN = re.compile(r"[^A-Za-z0-9!#$%&'*+.^_`|~-]+")


@dataclass(frozen=True)
class PlatformInfo:
    system: str
    release: str
    machine: str

    @classmethod
    def current(cls) -> PlatformInfo:
        uname = platform.uname()
        return cls(system=uname.system, release=uname.release, machine=uname.machine)


def build_user_agent(
    version: str, host: PlatformInfo, make: str | None = None, model: str | None = None
) -> str:
    """``tunnel-agent/<version> (<OS> <release>; <machine>) <make>/<model>``.

    Camera make and model come from configuration; they are reduced to HTTP token characters so a
    stray space or control character cannot break the header.
    """
    comment = "; ".join(
        part
        for part in (_comment_text(f"{host.system} {host.release}"), _comment_text(host.machine))
        if part
    )
    agent = f"tunnel-agent/{_token(version) or 'unknown'}"
    if comment:
        agent += f" ({comment})"
    camera = "/".join(t for t in (_token(make or ""), _token(model or "")) if t)
    if camera:
        agent += f" {camera}"
    return agent


def _token(text: str) -> str:
    return _NOT_TOKEN.sub("-", text.strip()).strip("-")


def _comment_text(text: str) -> str:
    return "".join(ch for ch in text.strip() if " " <= ch < "\x7f" and ch not in "()\\")
