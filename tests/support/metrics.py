"""Reading an agent's Prometheus metrics in tests."""

from __future__ import annotations

import re
import urllib.request


def scrape(observability_url: str) -> str:
    with urllib.request.urlopen(f"{observability_url}/metrics", timeout=10) as response:
        return response.read().decode()  # type: ignore[no-any-return]


def metric(text: str, name: str, **labels: str) -> float | None:
    """The value of one sample in Prometheus text format, or None."""
    for line in text.splitlines():
        if line.startswith("#") or not line.startswith(name):
            continue
        head, _, value = line.rpartition(" ")
        sample, _, label_text = head.partition("{")
        found = dict(re.findall(r'(\w+)="([^"]*)"', label_text))
        if sample == name and all(found.get(k) == v for k, v in labels.items()):
            return float(value)
    return None
