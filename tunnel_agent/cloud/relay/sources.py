"""Who may connect from where, and how often: allow-lists and per-source limits, no I/O.

A *source* is the consumer's IP address; IPv6 sources are grouped by /64, the block one
subscriber usually holds, so that rotating through one's own addresses gains nothing. Each limit
here is a plain object that is asked with the current time and answers yes or no.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
LOOPBACK_SOURCES = ("127.0.0.0/8", "::1/128")
MAX_TRACKED_SOURCES = 65_536
_IPV6_GROUP_PREFIX = 64


class InvalidSources(ValueError):
    """An allow-list entry that is not an IP network; the message names the entry."""


def parse_networks(values: Iterable[object]) -> tuple[Network, ...]:
    """CIDRs (or single addresses) to networks; host bits set are an error, not silently masked."""
    networks = []
    for value in values:
        if not isinstance(value, str):
            raise InvalidSources("allowedSources entries must be strings such as 203.0.113.0/24")
        try:
            networks.append(ipaddress.ip_network(value.strip(), strict=True))
        except ValueError:
            raise InvalidSources(f"{value!r} is not an IP network such as 203.0.113.0/24") from None
    return tuple(networks)


def address_of(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        address = ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def is_allowed(source: str, networks: Iterable[Network]) -> bool:
    address = address_of(source)
    return address is not None and any(
        address.version == network.version and address in network for network in networks
    )


def source_key(source: str) -> str:
    """The unit limits are counted in: the IPv4 address, or the IPv6 /64."""
    address = address_of(source)
    if isinstance(address, ipaddress.IPv6Address):
        return str(ipaddress.IPv6Network((address, _IPV6_GROUP_PREFIX), strict=False))
    return str(address) if address is not None else source


def single_source(source: str) -> tuple[Network, ...]:
    """The allow-list that admits exactly ``source`` (a session's default: its creator)."""
    address = address_of(source)
    if address is None:
        return ()
    return (ipaddress.ip_network(address),)


@dataclass
class TokenBucket:
    """``burst`` tokens, refilled at ``rate_per_s``; each event takes one."""

    burst: float
    rate_per_s: float
    tokens: float
    updated_at: float

    def _refill(self, now: float) -> None:
        self.tokens = min(self.burst, self.tokens + (now - self.updated_at) * self.rate_per_s)
        self.updated_at = now

    def take(self, now: float) -> bool:
        self._refill(now)
        if self.tokens < 1:
            return False
        self.tokens -= 1
        return True

    def empty(self, now: float) -> bool:
        self._refill(now)
        return self.tokens < 1

    def full(self, now: float) -> bool:
        self._refill(now)
        return self.tokens >= self.burst


class ConnectionLimits:
    """Per source: at most ``max_open`` connections at once, new ones at a token-bucket rate."""

    def __init__(self, max_open: int, burst: int, rate_per_s: float) -> None:
        self.max_open = max_open
        self.burst = burst
        self.rate_per_s = rate_per_s
        self.open: dict[str, int] = {}
        self._buckets: dict[str, TokenBucket] = {}

    def admit(self, source: str, now: float) -> str | None:
        """None if the connection may go ahead (and is now counted); else why not."""
        key = source_key(source)
        if self.open.get(key, 0) >= self.max_open:
            return "too many connections from this source"
        bucket = self._buckets.get(key)
        if bucket is None:
            self._forget_idle(now)
            bucket = self._buckets[key] = TokenBucket(self.burst, self.rate_per_s, self.burst, now)
        if not bucket.take(now):
            return "new connections too fast"
        self.open[key] = self.open.get(key, 0) + 1
        return None

    def release(self, source: str) -> None:
        key = source_key(source)
        left = self.open.get(key, 0) - 1
        if left > 0:
            self.open[key] = left
        else:
            self.open.pop(key, None)

    def _forget_idle(self, now: float) -> None:
        """Keep the table bounded: sources with nothing open and a full bucket carry no state."""
        if len(self._buckets) < MAX_TRACKED_SOURCES:
            return
        for key in [k for k, b in self._buckets.items() if k not in self.open and b.full(now)]:
            del self._buckets[key]
        while len(self._buckets) >= MAX_TRACKED_SOURCES:
            del self._buckets[next(iter(self._buckets))]


class FailureLimits:
    """Per source: after ``burst`` failures (wrong keys, wrong tokens) only ``rate_per_s`` more."""

    def __init__(self, burst: int, rate_per_s: float) -> None:
        self.burst = burst
        self.rate_per_s = rate_per_s
        self._buckets: dict[str, TokenBucket] = {}

    def blocked(self, source: str, now: float) -> bool:
        bucket = self._buckets.get(source_key(source))
        return bucket is not None and bucket.empty(now)

    def failed(self, source: str, now: float) -> None:
        key = source_key(source)
        bucket = self._buckets.get(key)
        if bucket is None:
            if len(self._buckets) >= MAX_TRACKED_SOURCES:
                for stale in [k for k, b in self._buckets.items() if b.full(now)]:
                    del self._buckets[stale]
            bucket = self._buckets[key] = TokenBucket(self.burst, self.rate_per_s, self.burst, now)
        bucket.take(now)
