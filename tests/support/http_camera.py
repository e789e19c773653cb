"""A camera's JPEG snapshot URL over HTTP, with Basic or Digest (RFC 7616, MD5, qop=auth) auth.

It behaves like a real camera: a request without valid credentials of its scheme gets a 401 with
the challenge, a Digest answer must be for this very request (method, URI, realm, nonce), and it
notes every request that carried a Basic password, so a test can tell whether the password was
ever sent in clear to a camera that asked for Digest.
"""

from __future__ import annotations

import base64
import hashlib
import re
import secrets

import av
from aiohttp import web

from tunnel_agent.media.encode import ImageEncoder


def _md5(text: str) -> str:
    return hashlib.md5(text.encode()).hexdigest()


class HttpCamera:
    realm = "camera"

    def __init__(self, scheme: str) -> None:
        self.scheme = scheme
        self.user, self.password = "viewer", f"Http-{scheme}-Secret"
        frame = av.VideoFrame(320, 240, "yuv420p")
        self.image = ImageEncoder("jpeg").encode(frame)
        self.nonce = secrets.token_hex(16)
        self.answers: list[int] = []  # the status of every request, in order
        self.basic_passwords_seen = 0
        self.url = ""
        self._runner: web.AppRunner | None = None

    async def __aenter__(self) -> HttpCamera:
        app = web.Application()
        app.router.add_get("/snapshot.jpg", self._snapshot)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{self._runner.addresses[0][1]}/snapshot.jpg?channel=1"
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _snapshot(self, request: web.Request) -> web.Response:
        header = request.headers.get("Authorization", "")
        if header.startswith("Basic "):
            self.basic_passwords_seen += 1
        ok = self._basic_ok(header) if self.scheme == "basic" else self._digest_ok(header, request)
        if not ok:
            self.answers.append(401)
            if self.scheme == "basic":
                challenge = f'Basic realm="{self.realm}"'
            else:
                challenge = (
                    f'Digest realm="{self.realm}", nonce="{self.nonce}", qop="auth", algorithm=MD5'
                )
            return web.Response(status=401, headers={"WWW-Authenticate": challenge})
        self.answers.append(200)
        return web.Response(body=self.image, content_type="image/jpeg")

    def _basic_ok(self, header: str) -> bool:
        expected = base64.b64encode(f"{self.user}:{self.password}".encode()).decode()
        return header == f"Basic {expected}"

    def _digest_ok(self, header: str, request: web.Request) -> bool:
        if not header.startswith("Digest "):
            return False
        fields = dict(re.findall(r'(\w+)="?([^",]*)"?', header[7:]))
        if (
            fields.get("username") != self.user
            or fields.get("realm") != self.realm
            or fields.get("nonce") != self.nonce
            or fields.get("uri") != request.path_qs  # an answer for this request, not another
            or fields.get("qop") != "auth"
            or not fields.get("nc")
            or not fields.get("cnonce")
        ):
            return False
        ha1 = _md5(f"{self.user}:{self.realm}:{self.password}")
        ha2 = _md5(f"{request.method}:{request.path_qs}")
        expected = _md5(f"{ha1}:{self.nonce}:{fields['nc']}:{fields['cnonce']}:auth:{ha2}")
        return secrets.compare_digest(expected, fields.get("response", ""))
