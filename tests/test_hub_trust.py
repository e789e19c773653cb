"""``hub.ca_file`` is extra trust, as the README says: the SDK is given the system's CAs and it."""

from __future__ import annotations

import ssl
from pathlib import Path

from tunnel_agent.cloud.devhub.certs import LocalCA
from tunnel_agent.hub.device_client import trust_bundle


def subjects(context: ssl.SSLContext) -> list[str]:
    return [str(cert["subject"]) for cert in context.get_ca_certs()]


def test_the_bundle_the_sdk_gets_keeps_the_system_store_and_adds_the_file(tmp_path: Path) -> None:
    extra = LocalCA(tmp_path / "ca")
    system = ssl.create_default_context()
    assert system.get_ca_certs(), "this machine has a system CA store"

    # What the SDK does with server_verification_cert: a context trusting exactly that text.
    sdk_like = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    sdk_like.load_verify_locations(cadata=trust_bundle(extra.cert_file))

    only_extra = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    only_extra.load_verify_locations(cafile=str(extra.cert_file))
    (extra_subject,) = subjects(only_extra)
    assert extra_subject in subjects(sdk_like)
    assert set(subjects(system)) <= set(subjects(sdk_like))
    assert len(sdk_like.get_ca_certs()) == len(system.get_ca_certs()) + 1
