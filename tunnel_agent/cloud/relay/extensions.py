"""Where features built on the relay plug in: their HTTP routes and their fields in session answers.

An extension is built once per relay (it may keep the :class:`~tunnel_agent.cloud.relay.core.Relay`
to check session tokens with ``relay.check_session`` and to open tunnels with
``relay.open_tunnel``), adds its aiohttp routes to the relay's application, may add fields to
every session answer (``POST/GET /v1/sessions``), and is closed when the relay stops. The tunnel
WebSocket paths (``/v1/tunnels/*``, ``/v1/sessions/*/connect``) belong to the pump; every other
path on the relay's port reaches aiohttp.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

from aiohttp import web

from tunnel_agent.cloud.relay.view.extension import ViewExtension

if TYPE_CHECKING:
    from tunnel_agent.cloud.relay.core import Relay
    from tunnel_agent.cloud.relay.sessions import Session


class RelayExtension(Protocol):
    def register(self, app: web.Application) -> None:
        """Add routes (or sub-applications) to the relay's aiohttp application."""

    def check_session_body(self, body: dict[str, Any]) -> None:
        """Check the extension's own fields of a ``POST /v1/sessions`` body (already a JSON
        object); raise ``InvalidSessionRequest`` (answered 400) for a bad one."""

    def session_created(self, session: Session, body: dict[str, Any]) -> None:
        """A session was made from ``body`` (checked by ``check_session_body``)."""

    def session_fields(self, session: Session, token: str | None) -> dict[str, Any]:
        """Extra fields for a session answer; ``token`` is given only in the creation answer."""

    async def close(self) -> None:
        """Release what the extension holds (tunnels, tasks) when the relay stops."""


def build_extensions(relay: Relay) -> list[RelayExtension]:
    """The relay's extensions, in the order their routes are registered. Add new ones here."""
    return [ViewExtension(relay)]
