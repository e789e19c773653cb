"""Media tasks that stop and come back: the low-disk guard, a failed task's retries, full queues,
a media server that stops reading."""

from __future__ import annotations

import asyncio
import re
import socket
import threading
import time
from fractions import Fraction
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import camera_entry
from tests.support.agent import AgentRunner
from tests.support.camera import RtspCamera
from tests.support.disk import SmallDisk
from tests.support.mqtt import MediaBroker
from tests.support.threadloop import ThreadLoop
from tests.support.waiting import until
from tests.test_media import FAST, restream_agent
from tests.test_rtsp_publisher import read_request
from tunnel_agent.media.backoff import Backoff
from tunnel_agent.media.mqtt import MqttPublisher, OutgoingMessage
from tunnel_agent.media.packets import MediaPacket
from tunnel_agent.media.settings import MqttSettings, StreamSettings
from tunnel_agent.media.tasks.base import FrameTask, PacketTask

MIB = 2**20


def states_of(agent: AgentRunner, stream: str) -> list[str]:
    return [e["state"] for e in agent.events("media.task_state") if e.get("stream") == stream]


def pngs(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.png")) if folder.is_dir() else []


class StalledMediaServer:
    """An RTSP media server that accepts every RECORD session and then reads nothing more.

    Its receive buffer is tiny, so the publisher's writes soon have nowhere to go.
    """

    def __init__(self) -> None:
        self.records_at: list[float] = []  # time.monotonic() of each RECORD answered
        self._loop = ThreadLoop("stalled-media-server")
        self.port = self._loop.run(self._listen())

    async def _listen(self) -> int:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # inherited by each session
        sock.bind(("127.0.0.1", 0))
        self._server = await asyncio.start_server(self._session, sock=sock)
        return int(sock.getsockname()[1])

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                method, headers, _ = await read_request(reader)
                transport = (
                    "Transport: RTP/AVP/TCP;unicast;interleaved=0-1\r\n"
                    if method == "SETUP"
                    else ""
                )
                writer.write(
                    f"RTSP/1.0 200 OK\r\nCSeq: {headers['cseq']}\r\nSession: 5150\r\n"
                    f"{transport}\r\n".encode()
                )
                if method == "RECORD":
                    writer.transport.pause_reading()
                    self.records_at.append(time.monotonic())
                    await asyncio.Event().wait()  # hold the session open, unread, until closed
        finally:
            writer.close()

    def close(self) -> None:
        self._server.close()
        self._loop.close()


async def test_a_task_paused_for_low_disk_resumes_and_a_failed_task_is_retried(
    tmp_path: Path, camera: RtspCamera
) -> None:
    disk = SmallDisk(tmp_path / "disk", 24 * MIB)
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where the folder should be")
    streams: list[dict[str, Any]] = [
        {
            "name": "guarded",
            "task": "snapshot-to-fs",
            "path": str(disk.mount_point / "snaps"),
            "snapshots_per_second": 2,
            "min_free_bytes": 8 * MIB,
        },
        {
            "name": "blocked",
            "task": "snapshot-to-fs",
            "path": str(blocker / "snaps"),
            "snapshots_per_second": 2,
        },
    ]
    agent = AgentRunner(
        tmp_path / "agent",
        {"cameras": [camera_entry(camera, streams=streams)], "media": FAST},
        wrap=disk.wrap,
    )
    try:
        agent.wait_event("agent.started")
        snaps = disk.seen_by(agent.process.pid) / "snaps"
        agent.process.wait_for(lambda _: len(pngs(snaps)) >= 2, 30)

        # The disk fills up (someone else's file): the task pauses and says why.
        ballast = disk.seen_by(agent.process.pid) / "ballast"
        ballast.write_bytes(b"\0" * (disk.free_bytes(agent.process.pid) - 4 * MIB))
        agent.process.wait_for(lambda _: states_of(agent, "guarded")[-1:] == ["paused"], 20)
        paused_with = len(pngs(snaps))
        # Room again: it resumes on its own and writes again.
        ballast.unlink()
        agent.process.wait_for(lambda _: states_of(agent, "guarded")[-1:] == ["running"], 20)
        agent.process.wait_for(lambda _: len(pngs(snaps)) >= paused_with + 2, 20)

        # The failed task is retried: once the folder can be made, it runs.
        agent.process.wait_for(lambda _: states_of(agent, "blocked").count("failed") >= 1, 20)
        blocker.unlink()
        agent.process.wait_for(lambda _: len(pngs(blocker / "snaps")) >= 2, 30)
    finally:
        agent.stop()

    paused = [e for e in agent.events("media.task_state") if e.get("state") == "paused"]
    assert paused[0]["stream"] == "guarded" and paused[0]["reason"].startswith("low disk")
    guarded = states_of(agent, "guarded")
    assert guarded[guarded.index("paused") :].count("running") >= 1
    blocked = states_of(agent, "blocked")
    assert "cannot write to" in next(
        e["reason"] for e in agent.events("media.task_state") if e.get("state") == "failed"
    )
    assert blocked[blocked.index("failed") :].count("running") == 1


class Held:
    """A task's work that waits for the test (``release``), so that its queue fills up."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.busy = threading.Event()
        self.handled: list[Any] = []

    def hold(self, what: Any) -> None:
        self.busy.set()
        self.release.wait(10)
        self.handled.append(what)


class HeldTask(FrameTask, Held):
    """A snapshot task whose work waits for the test."""

    queue_size = 3

    def __init__(self, folder: Path) -> None:
        settings = StreamSettings(name="held", task="snapshot-to-fs", path=folder)
        FrameTask.__init__(self, "cam", settings, Backoff())
        Held.__init__(self)

    def handle(self, item: Any) -> None:
        self.hold(item)


@pytest.mark.timeout(90)
async def test_a_media_server_that_stops_reading_is_lost_within_the_write_timeout_then_retried(
    tmp_path: Path, camera: RtspCamera
) -> None:
    write_timeout_s = 2.0
    margin_s = 8.0  # filling the socket buffers, the kernel's probe timer, a loaded machine
    server = StalledMediaServer()
    agent = restream_agent(
        tmp_path / "agent", camera, server.port, "stalled", server_write_timeout=write_timeout_s
    )

    def failures() -> list[dict[str, Any]]:
        return [e for e in agent.events("media.task_state") if e.get("state") == "failed"]

    try:
        await until(lambda: server.records_at, timeout_s=30)
        await until(failures, timeout_s=write_timeout_s + margin_s)
        await until(lambda: len(server.records_at) >= 2, timeout_s=30)
    finally:
        agent.stop()
        server.close()
    (failed, *_) = failures()
    assert failed["stream"] == "out"
    assert failed["reason"].startswith(f"lost rtsp://127.0.0.1:{server.port}/stalled: ")
    assert int(failed["packets"]) > 0
    assert len(agent.events("media.restream_connected")) >= 2
    assert not agent.events("media.restream_write_unbounded")
    assert server.records_at[1] - server.records_at[0] >= write_timeout_s


async def test_a_full_task_queue_drops_the_oldest_item(tmp_path: Path) -> None:
    task = HeldTask(tmp_path)
    task.start()
    try:
        task.on_frame(0)  # type: ignore[arg-type]  # taken at once, then held
        await asyncio.to_thread(task.busy.wait, 10)
        for item in range(1, 6):
            task.on_frame(item)  # type: ignore[arg-type]
        task.release.set()
        await until(lambda: len(task.handled) == 4, 10)
    finally:
        task.release.set()
        await asyncio.to_thread(task.stop)
    assert task.handled == [0, 3, 4, 5]  # 1 and 2, the oldest waiting, were dropped
    assert task.counters["dropped_queue_full"] == 2


class HeldPacketTask(PacketTask, Held):
    """A packet task that holds its first packet until the test releases it."""

    queue_size = 1

    def __init__(self) -> None:
        settings = StreamSettings(name="held", task="stream-to-rtsp", media_server_address="::1")
        PacketTask.__init__(self, "cam", settings, Backoff())
        Held.__init__(self)

    def handle(self, item: Any) -> None:
        self.hold(item.dts)


def packet_at(seconds: float) -> MediaPacket:
    dts = round(seconds * 90_000)
    return MediaPacket(b"x", dts, dts, Fraction(1, 90_000), False, 1, 0.0)


async def test_packets_go_to_a_task_in_batches_of_batch_s_and_drops_count_packets() -> None:
    task = HeldPacketTask()
    assert task.batch_s == 0.1
    task.start()
    try:
        task.on_packet(packet_at(0.0))
        task.on_packet(packet_at(0.2))  # spans 0.2 s: the batch goes, and is held at its first
        await asyncio.to_thread(task.busy.wait, 10)
        for seconds in (1.00, 1.04, 1.08):
            task.on_packet(packet_at(seconds))
        assert task.counters["dropped_queue_full"] == 0
        task.on_packet(packet_at(1.12))  # 0.12 s since 1.00: a batch of 4 fills the queue
        for seconds in (1.16, 1.20, 1.24, 1.28):
            task.on_packet(packet_at(seconds))  # the next batch of 4 pushes the first one out
        assert task.counters["dropped_queue_full"] == 4
        task.release.set()
        await until(lambda: len(task.handled) == 6, 10)
        task.on_packet(packet_at(1.32))
        task.flush()  # what is left goes on demand (the source flushes when it stops reading)
        await until(lambda: len(task.handled) == 7, 10)
    finally:
        task.release.set()
        await asyncio.to_thread(task.stop)
    assert task.handled == [packet_at(s).dts for s in (0.0, 0.2, 1.16, 1.20, 1.24, 1.28, 1.32)]


async def test_while_the_broker_is_down_the_mqtt_queue_drops_the_oldest(tmp_path: Path) -> None:
    broker = MediaBroker(tmp_path, log_all=True)
    broker.stop()  # down from the start: the publisher can only queue
    settings = MqttSettings(
        url=f"mqtt://127.0.0.1:{broker.port}", queue_size=3, client_id="queue-test", protocol=5
    )
    publisher = MqttPublisher(settings, Backoff(initial_s=0.2, max_s=0.4))
    running = asyncio.create_task(publisher.run())
    try:
        await until(lambda: publisher.counters["connect_failed"] >= 1, 10)
        for number in range(1, 6):
            publisher.offer(
                OutgoingMessage(f"queue/{number}", b"image", 1, False, None, "image/jpeg", ())
            )
        await until(lambda: publisher.counters["dropped_queue_full"] == 2, 10)
        broker.start()
        await until(lambda: publisher.counters["published"] == 3, 20)
    finally:
        running.cancel()
        await asyncio.gather(running, return_exceptions=True)
        broker.stop()
    received = re.findall(r"Received PUBLISH from queue-test \(.*?'(queue/\d)'", broker.log())
    assert received == ["queue/3", "queue/4", "queue/5"]  # 1 and 2, the oldest, were dropped
