"""Certificates for the emulator: one local CA, server certificates for the brokers, device certs.

trustme makes real X.509 certificates in milliseconds; they are written as PEM files so that
mosquitto, the SDK and ffmpeg can all read them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import trustme

CA_FILE = "ca.pem"
CA_KEY_FILE = "ca-key.pem"


@dataclass(frozen=True)
class CertPair:
    cert_file: Path
    key_file: Path


class LocalCA:
    """A CA kept in a folder so that restarts reuse it (devices keep trusting the same CA)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        cert, key = folder / CA_FILE, folder / CA_KEY_FILE
        if cert.exists() and key.exists():
            self._ca = trustme.CA.from_pem(cert.read_bytes(), key.read_bytes())
        else:
            self._ca = trustme.CA(organization_name="tunnel-agent devhub")
            self._ca.cert_pem.write_to_path(str(cert))
            _write_private(key, self._ca.private_key_pem.bytes())

    @property
    def cert_file(self) -> Path:
        return self.folder / CA_FILE

    def issue(self, name: str, hosts: list[str]) -> CertPair:
        """A leaf certificate for ``hosts`` (names or IPs): ``<name>.pem``, ``<name>-key.pem``.

        trustme leaves carry both the serverAuth and clientAuth usages: one kind serves brokers
        and X.509 devices.
        """
        leaf = self._ca.issue_cert(*hosts, common_name=hosts[0] if hosts else name)
        cert = self.folder / f"{name}.pem"
        key = self.folder / f"{name}-key.pem"
        with cert.open("wb") as handle:
            for blob in leaf.cert_chain_pems:
                handle.write(blob.bytes())
        _write_private(key, leaf.private_key_pem.bytes())
        return CertPair(cert, key)


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
