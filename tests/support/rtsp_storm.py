"""Many RTSP clients at once against one test camera, leaving at random moments.

Each client speaks RTSP over interleaved TCP on a raw socket and follows one of a few scripts:
leave after DESCRIBE, right after SETUP, with PLAY sent but its answer not read, while playing,
or with a TEARDOWN while others play. Every PLAY asks ``Range: npt=0-``, as FFmpeg does. It is the
traffic under which gst-rtsp-server 1.22's shared media aborted (``gst_rtsp_media_get_rates:
assertion failed``) when a PLAY's seek landed while an earlier PLAY was still starting the stream:

    python -m tests.support.rtsp_storm --burst --runs 8 --seconds 20 --clients 10
    python -m tests.support.rtsp_storm --burst --runs 8 --seconds 20 --clients 10 --seek-on-play

Each run starts a fresh camera, storms it, and counts it as crashed if the camera exits. The
last line says ``crashed <n> of <runs>``; every crash's last log lines are printed first.
``--seek-on-play`` starts the camera with gst-rtsp-server's own seeking PLAY (the crash);
``--no-range`` sends PLAY without a Range.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import re
import signal
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from tests.support.camera import RtspCamera
from tests.support.processes import stop_all

SCRIPTS = ("describe", "setup", "play_unread", "play", "teardown")
PLAY_RANGE = {"Range": "npt=0-"}  # what FFmpeg (PyAV, ffprobe) sends
REPLY_TIMEOUT_S = 10.0


class RtspReplyError(Exception):
    """The camera answered a request with something other than 200."""


@dataclass
class Tally:
    scripts: Counter[str] = field(default_factory=Counter)
    statuses: Counter[str] = field(default_factory=Counter)
    rtp_bytes: int = 0


class RawRtspClient:
    """Just enough RTSP to DESCRIBE, SETUP over TCP, PLAY and TEARDOWN one track."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, url: str):
        self.reader, self.writer, self.url = reader, writer, url
        self.cseq = 0
        self.session: str | None = None
        self.rtp_bytes = 0
        self.rtp_timestamps: list[int] = []  # of the first track's RTP packets, in order

    def send(self, method: str, url: str, headers: dict[str, str] | None = None) -> None:
        self.cseq += 1
        lines = [f"{method} {url} RTSP/1.0", f"CSeq: {self.cseq}", "User-Agent: rtsp-storm"]
        if self.session:
            lines.append(f"Session: {self.session}")
        lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
        self.writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())

    async def reply(self) -> tuple[int, dict[str, str], bytes]:
        """The next RTSP answer; interleaved RTP/RTCP frames before it are counted and skipped."""
        while True:
            first = await self.reader.readexactly(1)
            if first == b"$":
                head = await self.reader.readexactly(3)
                packet = await self.reader.readexactly(int.from_bytes(head[1:3], "big"))
                self.rtp_bytes += len(packet)
                if head[0] == 0 and len(packet) >= 8:
                    self.rtp_timestamps.append(int.from_bytes(packet[4:8], "big"))
                continue
            head = first + await self.reader.readuntil(b"\r\n\r\n")
            status_line, *header_lines = head.decode("latin-1").split("\r\n")
            headers = {}
            for line in header_lines:
                if ":" in line:
                    name, value = line.split(":", 1)
                    headers[name.strip().lower()] = value.strip()
            body = await self.reader.readexactly(int(headers.get("content-length", "0")))
            return int(status_line.split()[1]), headers, body

    async def request(
        self, method: str, url: str, headers: dict[str, str] | None = None
    ) -> tuple[dict[str, str], bytes]:
        self.send(method, url, headers)
        status, answer, body = await asyncio.wait_for(self.reply(), REPLY_TIMEOUT_S)
        if status != 200:
            raise RtspReplyError(f"{method} {status}")
        return answer, body

    async def describe(self) -> str:
        """The track's control URL."""
        answer, body = await self.request("DESCRIBE", self.url, {"Accept": "application/sdp"})
        base = answer.get("content-base", self.url + "/")
        control = re.search(r"a=control:(\S+)", body.decode()[body.decode().find("m=") :])
        track = control.group(1) if control else "stream=0"
        return track if track.startswith("rtsp://") else base.rstrip("/") + "/" + track

    async def setup(self, track: str) -> None:
        transport = "RTP/AVP/TCP;unicast;interleaved=0-1"
        answer, _ = await self.request("SETUP", track, {"Transport": transport})
        self.session = answer["session"].split(";")[0]

    async def read_media(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            try:
                await asyncio.wait_for(self.reply(), left)
            except TimeoutError:
                return


async def connect(camera: RtspCamera) -> RawRtspClient:
    connecting = asyncio.open_connection(camera.host, camera.port)
    reader, writer = await asyncio.wait_for(connecting, REPLY_TIMEOUT_S)
    return RawRtspClient(reader, writer, camera.url())


async def player(camera: RtspCamera) -> RawRtspClient:
    """A client that has PLAYed from the start, as FFmpeg asks."""
    client = await connect(camera)
    await client.setup(await client.describe())
    await client.request("PLAY", client.url, PLAY_RANGE)
    return client


async def one_client(camera: RtspCamera, rng: random.Random, tally: Tally) -> None:
    script = rng.choice(SCRIPTS)
    tally.scripts[script] += 1
    client = await connect(camera)
    url, writer = client.url, client.writer
    try:
        track = await client.describe()
        if script == "describe":
            return
        await client.setup(track)
        if script == "setup":
            return
        if script == "play_unread":
            client.send("PLAY", url, PLAY_RANGE)
            await writer.drain()
            await asyncio.sleep(rng.uniform(0, 0.05))
            return
        await client.request("PLAY", url, PLAY_RANGE)
        await client.read_media(rng.uniform(0, 2.0))
        if script == "teardown":
            await client.request("TEARDOWN", url)
        tally.statuses["ok"] += 1
    except RtspReplyError as error:
        tally.statuses[str(error)] += 1
    except (OSError, asyncio.IncompleteReadError, TimeoutError) as error:
        tally.statuses[type(error).__name__] += 1
    finally:
        tally.rtp_bytes += client.rtp_bytes
        writer.close()


async def storm(
    camera: RtspCamera, clients: int, seconds: float, seed: int, *, burst: bool
) -> Tally:
    """``clients`` workers, each starting a new client as soon as its last one is gone; with
    ``burst``, all of them start together, round after round, as a test's ten consumers do."""
    tally = Tally()
    deadline = time.monotonic() + seconds
    rngs = [random.Random(seed * 1000 + index) for index in range(clients)]

    def running() -> bool:
        return time.monotonic() < deadline and camera.process.process.poll() is None

    async def client(index: int) -> bool:
        try:
            await one_client(camera, rngs[index], tally)
        except OSError as error:  # refused: the camera is gone
            tally.statuses[type(error).__name__] += 1
            return False
        return True

    async def worker(index: int) -> None:
        while running() and await client(index):
            pass

    if burst:
        while running():
            await asyncio.gather(*(client(i) for i in range(clients)))
    else:
        await asyncio.gather(*(worker(i) for i in range(clients)))
    return tally


def stop_on_signal(signum: int, _frame: object) -> None:
    """SIGTERM (``timeout``, a CI's cancel) ends the run the way Ctrl-C does: through the
    ``finally`` clauses that stop the cameras, which run in sessions of their own and would
    otherwise outlive it."""
    raise SystemExit(128 + signum)


def main() -> None:
    signal.signal(signal.SIGTERM, stop_on_signal)
    try:
        storm_runs()
    finally:
        stop_all()


def storm_runs() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--clients", type=int, default=12)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--no-range", action="store_true", help="PLAY without a Range header")
    parser.add_argument("--seek-on-play", action="store_true", help="the camera's seeking PLAY")
    parser.add_argument("--burst", action="store_true", help="clients start together, in rounds")
    args = parser.parse_args()
    if args.no_range:
        PLAY_RANGE.clear()
    crashed = 0
    with tempfile.TemporaryDirectory(prefix="rtsp-storm-") as folder:
        for run in range(args.runs):
            extra = ["--seek-on-play"] if args.seek_on_play else []
            camera = RtspCamera(Path(folder) / f"run-{run}", extra=extra)
            try:
                tally = asyncio.run(
                    storm(camera, args.clients, args.seconds, args.seed + run, burst=args.burst)
                )
                code = camera.process.process.poll()
                if code is not None:
                    crashed += 1
                    print(f"run {run}: camera exited {code}:\n{camera.process.output()[-1500:]}")
                print(
                    f"run {run}: {'CRASHED' if code is not None else 'alive'} "
                    f"scripts={dict(tally.scripts)} statuses={dict(tally.statuses)} "
                    f"rtp_bytes={tally.rtp_bytes}",
                    flush=True,
                )
            finally:
                camera.stop()
    print(f"crashed {crashed} of {args.runs}")


if __name__ == "__main__":
    main()
