"""azure-iot-device, imported and built without the HTTP half the agent never uses.

The SDK's package ``__init__`` imports every client it has. Two of its modules pull in
``requests`` (with urllib3, idna, charset_normalizer, http.cookiejar: ~130 modules, ~5 MiB):
``iothub.edge_hsm`` (IoT Edge's HSM, which also runs ``requests_unixsocket.monkeypatch()`` at
import) and ``common.pipeline.pipeline_stages_http`` (blob upload and IoT Edge method calls). And
every client factory builds an HTTP pipeline at once, with its own TLS context holding the trust
bundle and a ``requests`` adapter, used only by ``get_storage_info_for_blob``,
``notify_blob_upload_status`` and ``invoke_method``: the agent calls none of them.

So the SDK is imported here, and only here, with those two modules loaded lazily (the standard
library's ``importlib.util.LazyLoader``: the module runs on its first attribute access, if ever),
and the agent's clients are built with a stand-in for the HTTP pipeline (:func:`mqtt_only`).
Everything else is the SDK's own code, unchanged. Were the SDK imported earlier in the process,
the lazy loading simply does not happen; nothing else changes.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from types import ModuleType
from typing import TypeVar

# Loaded lazily: what only IoT Edge and blob upload need.
LAZY_MODULES = frozenset(
    {
        "azure.iot.device.iothub.edge_hsm",
        "azure.iot.device.common.pipeline.pipeline_stages_http",
    }
)
T = TypeVar("T")


class _LazyFinder(importlib.abc.MetaPathFinder):
    """Finds ``LAZY_MODULES`` where the normal path finder does, and defers running them."""

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname not in LAZY_MODULES:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path, target)
        if spec is None or not isinstance(spec.loader, importlib.abc.Loader):
            return None
        spec.loader = importlib.util.LazyLoader(spec.loader)
        return spec


def _import_sdk() -> None:
    finder = _LazyFinder()
    sys.meta_path.insert(0, finder)
    try:
        import azure.iot.device.aio  # noqa: F401  (the package and its aio clients)
    finally:
        sys.meta_path.remove(finder)


_import_sdk()

from azure.iot.device import X509, MethodRequest, MethodResponse, ProxyOptions  # noqa: E402
from azure.iot.device.aio import IoTHubDeviceClient, ProvisioningDeviceClient  # noqa: E402
from azure.iot.device.iothub import pipeline as _iothub_pipeline  # noqa: E402

__all__ = [
    "X509",
    "IoTHubDeviceClient",
    "MethodRequest",
    "MethodResponse",
    "ProvisioningDeviceClient",
    "ProxyOptions",
    "mqtt_only",
]


class NoHttpPipeline:
    """Takes the HTTP pipeline's place in the agent's clients: blob upload and IoT Edge method
    calls are the only users of it, and the agent makes neither."""

    def __init__(self, pipeline_configuration: object) -> None:
        self.pipeline_configuration = pipeline_configuration

    def __getattr__(self, name: str) -> object:
        raise AttributeError(f"the agent's IoT Hub client has no HTTP pipeline (asked for {name})")


_building = threading.Lock()


@contextmanager
def _without_http_pipeline() -> Iterator[None]:
    """The SDK's factories look ``pipeline.HTTPPipeline`` up when they run: for the length of one
    factory call (one at a time), that name is the stand-in."""
    with _building:
        real = getattr(_iothub_pipeline, "HTTPPipeline")  # noqa: B009  (not exported: untyped)
        setattr(_iothub_pipeline, "HTTPPipeline", NoHttpPipeline)  # noqa: B010
        try:
            yield
        finally:
            setattr(_iothub_pipeline, "HTTPPipeline", real)  # noqa: B010


def mqtt_only(factory: Callable[[], T]) -> T:
    """Run an SDK client factory (``IoTHubDeviceClient.create_from_*``) without an HTTP pipeline;
    the provisioning client has none to begin with."""
    with _without_http_pipeline():
        return factory()
