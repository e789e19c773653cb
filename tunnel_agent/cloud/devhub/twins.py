"""Device twins as IoT Hub keeps them: tags, desired and reported properties, versions, etags.

One JSON file per device in the state folder's ``twins/``; only the running devhub writes them.
"""

from __future__ import annotations

import base64
import contextlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


def merge_patch(target: dict[str, Any], patch: dict[str, Any]) -> None:
    """JSON merge patch as twins apply it: ``null`` deletes, objects merge, the rest replaces."""
    for key, value in patch.items():
        if value is None:
            target.pop(key, None)
        elif isinstance(value, dict) and isinstance(target.get(key), dict):
            merge_patch(target[key], value)
        elif isinstance(value, dict):
            target[key] = {}
            merge_patch(target[key], value)
        else:
            target[key] = value


def _without_metadata(properties: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in properties.items() if not k.startswith("$")}


@dataclass
class Twin:
    desired: dict[str, Any] = field(default_factory=lambda: {"$version": 1})
    reported: dict[str, Any] = field(default_factory=lambda: {"$version": 1})
    tags: dict[str, Any] = field(default_factory=dict)
    version: int = 1
    model_id: str = ""

    @property
    def etag(self) -> str:
        return base64.b64encode(self.version.to_bytes(8, "big")).decode()

    def document(self) -> dict[str, Any]:
        """What a device gets for ``$iothub/twin/GET``."""
        return {"desired": self.desired, "reported": self.reported}

    def patch_reported(self, patch: dict[str, Any]) -> int:
        merge_patch(self.reported, _without_metadata(patch))
        self.reported["$version"] = int(self.reported.get("$version", 1)) + 1
        self.version += 1
        return int(self.reported["$version"])

    def patch_desired(self, patch: dict[str, Any]) -> int:
        merge_patch(self.desired, _without_metadata(patch))
        self.desired["$version"] = int(self.desired.get("$version", 1)) + 1
        self.version += 1
        return int(self.desired["$version"])

    def replace_desired(self, desired: dict[str, Any]) -> dict[str, Any]:
        """Replace all desired properties; the patch a device needs to follow (removed -> null)."""
        new = _without_metadata(desired)
        patch: dict[str, Any] = {k: None for k in _without_metadata(self.desired) if k not in new}
        patch.update(new)
        self.desired = {**new, "$version": int(self.desired.get("$version", 1)) + 1}
        self.version += 1
        return patch

    def patch_tags(self, patch: dict[str, Any]) -> None:
        merge_patch(self.tags, patch)
        self.version += 1

    def replace_tags(self, tags: dict[str, Any]) -> None:
        self.tags = dict(tags)
        self.version += 1

    def to_json(self) -> dict[str, Any]:
        return {
            "desired": self.desired,
            "reported": self.reported,
            "tags": self.tags,
            "version": self.version,
            "modelId": self.model_id,
        }

    @classmethod
    def from_json(cls, document: dict[str, Any]) -> Twin:
        return cls(
            document["desired"],
            document["reported"],
            document.get("tags", {}),
            int(document.get("version", 1)),
            str(document.get("modelId", "")),
        )


class TwinStore:
    """Twins in memory, written through to ``<folder>/<device id>.json``."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._twins: dict[str, Twin] = {}

    def _path(self, device_id: str) -> Path:
        # Device ids may hold characters a file name should not (``*``, ``?``, ``:``).
        return self.folder / f"{device_id.encode().hex()}.json"

    def get(self, device_id: str) -> Twin:
        twin = self._twins.get(device_id)
        if twin is None:
            twin = Twin()
            with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
                twin = Twin.from_json(json.loads(self._path(device_id).read_text()))
            self._twins[device_id] = twin
        return twin

    def save(self, device_id: str) -> None:
        twin = self._twins.get(device_id)
        if twin is None:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self._path(device_id)
        temporary = path.with_suffix(".tmp")
        temporary.write_text(json.dumps(twin.to_json()))
        temporary.replace(path)

    def forget(self, device_id: str) -> None:
        self._twins.pop(device_id, None)
        self._path(device_id).unlink(missing_ok=True)
