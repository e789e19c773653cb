"""A synthetic RTSP camera on GStreamer's gst-rtsp-server: H.264 test pattern, optional Basic or
Digest auth.

Run with the system interpreter that has the GObject bindings (Debian: python3-gi and
gir1.2-gst-rtsp-server-1.0), not a virtual environment:

    /usr/bin/python3 rtsp_camera.py --port 8554 --path /test [--user U --password P [--auth digest]]

``--codec h265`` serves H.265, ``--audio`` adds an AAC track, and ``--clock`` replaces the test
pattern with the camera's wall clock burned into the picture: the top ``CLOCK_BAND_ROWS`` rows hold
``CLOCK_BITS`` black/white blocks, the epoch time in milliseconds modulo 2**32, most significant bit
first, so a viewer can measure camera-to-screen latency from the picture alone.

It can also serve a RECORD mount (``--record-path``) that accepts ANNOUNCE/RECORD publishers and
counts the frames it decodes, for re-streaming tests. It prints ``READY <port>`` once listening,
``RECORD <n>`` every second while a publisher is decoded, and stops on SIGTERM or SIGINT.

The live stream is shared by all viewers and does not seek: a PLAY joins it as it is, whatever
its ``Range`` (``--seek-on-play`` lets a PLAY restart it for everyone, as gst-rtsp-server would).

This file must not import the tunnel_agent package: it runs outside the package's environment.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time

import gi

gi.require_version("Gst", "1.0")
gi.require_version("GstRtsp", "1.0")
gi.require_version("GstRtspServer", "1.0")
from gi.repository import Gio, GLib, Gst, GstRtsp, GstRtspServer  # noqa: E402

PATTERN_SOURCE = (
    "videotestsrc is-live=true pattern={pattern} ! "
    "video/x-raw,format=I420,width={width},height={height},framerate={fps}/1 ! "
)
ENCODERS = {
    "h264": "x264enc tune=zerolatency speed-preset=ultrafast key-int-max={gop} bitrate={kbps} ! "
    "rtph264pay name=pay0 pt=96 config-interval=1",
    "h265": "x265enc tune=zerolatency speed-preset=ultrafast key-int-max={gop} bitrate={kbps} ! "
    "rtph265pay name=pay0 pt=96 config-interval=1",
}
CLOCK_SOURCE = (
    "appsrc name=clock is-live=true do-timestamp=true format=time "
    "caps=video/x-raw,format=I420,width={width},height={height},framerate={fps}/1 ! "
)
AUDIO_BRANCH = (
    " audiotestsrc is-live=true wave=sine freq=440 ! audioconvert ! audioresample ! "
    "audio/x-raw,rate=48000,channels=1 ! voaacenc bitrate=64000 ! rtpmp4gpay name=pay1 pt=97"
)
CLOCK_BITS = 32
CLOCK_BAND_ROWS = 32
REQUIRED_ELEMENTS = ("videotestsrc", "x264enc", "rtph264pay", "decodebin", "videoconvert")
RECORD_SINK = "( decodebin name=depay0 ! videoconvert ! fakesink name=frames signal-handoffs=true )"


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8554)
    parser.add_argument("--path", default="/test")
    parser.add_argument("--user")
    parser.add_argument("--password", help="prefer the RTSP_CAMERA_PASSWORD environment variable")
    parser.add_argument("--auth", choices=["basic", "digest"], default="basic", help="with --user")
    parser.add_argument("--width", type=int, default=640)
    parser.add_argument("--height", type=int, default=360)
    parser.add_argument("--fps", type=int, default=15)
    parser.add_argument("--gop", type=int, default=15, help="frames between keyframes")
    parser.add_argument("--kbps", type=int, default=1000)
    parser.add_argument("--pattern", default="smpte")
    parser.add_argument("--codec", choices=sorted(ENCODERS), default="h264")
    parser.add_argument(
        "--bframes", type=int, default=0, help="H.264 B-frames between references (reordered)"
    )
    parser.add_argument("--audio", action="store_true", help="add an AAC audio track")
    parser.add_argument("--clock", action="store_true", help="burn the wall clock into the picture")
    parser.add_argument("--record-path", help="also serve a RECORD mount at this path")
    parser.add_argument("--tls-cert", help="PEM certificate + key file: serve RTSPS")
    parser.add_argument(
        "--seek-on-play",
        action="store_true",
        help="let a PLAY's Range seek the shared stream, restarting every viewer's timestamps",
    )
    parser.add_argument("--check", action="store_true", help="check the GStreamer plugins and exit")
    return parser.parse_args(argv)


class ClockPicture:
    """Pushes frames that show the wall clock (see the module docstring) into an appsrc."""

    def __init__(self, width: int, height: int, fps: int) -> None:
        self.width, self.height, self.fps = width, height, fps
        self.bit_width = width // CLOCK_BITS
        rest = bytes([128]) * (width * (height - CLOCK_BAND_ROWS))
        self.tail = rest + bytes([128]) * (width * height // 2)  # grey below, neutral chroma

    def frame(self, epoch_ms: int) -> bytes:
        value = epoch_ms % 2**CLOCK_BITS
        row = bytearray()
        for bit in range(CLOCK_BITS):
            on = value >> (CLOCK_BITS - 1 - bit) & 1
            row += bytes([235 if on else 16]) * self.bit_width
        row += bytes([128]) * (self.width - len(row))
        return bytes(row) * CLOCK_BAND_ROWS + self.tail

    def attach(self, media: GstRtspServer.RTSPMedia) -> None:
        source = media.get_element().get_by_name("clock")
        if source is None:
            return
        running = [True]
        media.connect("unprepared", lambda *_: running.__setitem__(0, False))

        def push() -> bool:
            if not running[0]:
                return False
            data = self.frame(int(time.time() * 1000))
            source.emit("push-buffer", Gst.Buffer.new_wrapped(data))
            return True

        GLib.timeout_add(max(1, 1000 // self.fps), push)


class FrameCounter:
    def __init__(self) -> None:
        self.frames = 0

    def attach(self, media: GstRtspServer.RTSPMedia) -> None:
        sink = media.get_element().get_by_name("frames")
        if sink is not None:
            sink.connect("handoff", self._on_frame)

    def _on_frame(self, *_: object) -> None:
        self.frames += 1


def require_auth(
    server: GstRtspServer.RTSPServer,
    factories: list[GstRtspServer.RTSPMediaFactory],
    user: str,
    password: str,
    method: str,
) -> None:
    auth = GstRtspServer.RTSPAuth()
    if method == "digest":
        auth.add_digest(user, password, _token("user"))
        auth.set_supported_methods(GstRtsp.RTSPAuthMethod.DIGEST)
    else:
        auth.add_basic(GstRtspServer.RTSPAuth.make_basic(user, password), _token("user"))
    server.set_auth(auth)
    _allow(factories, "user")


def _token(role: str) -> GstRtspServer.RTSPToken:
    token = GstRtspServer.RTSPToken()
    token.set_string(GstRtspServer.RTSP_TOKEN_MEDIA_FACTORY_ROLE, role)
    return token


def _allow(factories: list[GstRtspServer.RTSPMediaFactory], role: str) -> None:
    permissions = GstRtspServer.RTSPPermissions()
    permissions.add_role(role)
    permissions.add_permission_for_role(role, "media.factory.access", True)
    permissions.add_permission_for_role(role, "media.factory.construct", True)
    for factory in factories:
        factory.set_permissions(permissions)


def live_factory(args: argparse.Namespace) -> GstRtspServer.RTSPMediaFactory:
    """The shared camera stream: test pattern or clock picture, H.264 or H.265, maybe AAC."""
    live = GstRtspServer.RTSPMediaFactory()
    source = CLOCK_SOURCE if args.clock else PATTERN_SOURCE
    launch = (source + ENCODERS[args.codec]).format(
        pattern=args.pattern,
        width=args.width,
        height=args.height,
        fps=args.fps,
        gop=args.gop,
        kbps=args.kbps,
    )
    if args.bframes and args.codec == "h264":
        # zerolatency forbids B-frames, and so does the baseline profile the payloader would
        # otherwise get: main profile, and x264 reorders as a camera with B-frames does.
        launch = launch.replace(
            "tune=zerolatency", f"bframes={args.bframes} b-adapt=false rc-lookahead=0"
        ).replace(" ! rtph264pay", " ! video/x-h264,profile=main ! rtph264pay")
    if args.audio:
        launch += AUDIO_BRANCH
    live.set_launch(f"( {launch} )")
    if args.clock:
        clock = ClockPicture(args.width, args.height, args.fps)
        live.connect("media-configure", lambda _factory, media: clock.attach(media))
    if not args.seek_on_play:
        live.connect("media-configure", lambda _factory, media: not_seekable(media))
    live.set_shared(True)
    return live


def not_seekable(media: GstRtspServer.RTSPMedia) -> None:
    """The shared live stream answers "not seekable", as a live camera's stream is.

    FFmpeg (PyAV, ffprobe) PLAYs with ``Range: npt=0.000-``. ``videotestsrc`` says it can seek,
    so gst-rtsp-server 1.22 turns every such PLAY into a flushing seek of the one pipeline all
    viewers share: it restarts every other viewer's stream, and when it lands while an earlier
    PLAY's state change is still completing, the seek's wait returns on that change's ASYNC_DONE
    with the segment flushed away and ``gst_rtsp_media_get_rates`` aborts the process on
    ``g_assert (FALSE)`` (``tests/support/rtsp_storm.py --burst`` reproduces it). A media that is
    not seekable skips the seek: each viewer joins the stream as it is. ``--seek-on-play`` keeps
    gst-rtsp-server's behaviour, for tests of a source whose timestamps jump back."""

    def answer(_pad: Gst.Pad, info: Gst.PadProbeInfo) -> Gst.PadProbeReturn:
        query = info.get_query()
        if query is None or query.type != Gst.QueryType.SEEKING:
            return Gst.PadProbeReturn.OK
        query.set_seeking(Gst.Format.TIME, False, 0, -1)
        return Gst.PadProbeReturn.HANDLED

    for index in range(media.n_streams()):
        pad = media.get_stream(index).get_srcpad()
        pad.add_probe(Gst.PadProbeType.QUERY_UPSTREAM, answer)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    password = os.environ.get("RTSP_CAMERA_PASSWORD") or args.password
    Gst.init(None)
    missing = [e for e in REQUIRED_ELEMENTS if Gst.ElementFactory.find(e) is None]
    if missing:
        print(f"ERROR missing GStreamer elements: {', '.join(missing)}", flush=True)
        return 1
    if args.check:
        print("OK", flush=True)
        return 0
    server = GstRtspServer.RTSPServer()
    server.set_address(args.host)
    server.set_service(str(args.port))

    live = live_factory(args)
    mounts = server.get_mount_points()
    mounts.add_factory(args.path, live)

    counter = FrameCounter()
    record = None
    if args.record_path:
        record = GstRtspServer.RTSPMediaFactory()
        record.set_transport_mode(GstRtspServer.RTSPTransportMode.RECORD)
        record.set_launch(RECORD_SINK)
        record.connect("media-configure", lambda _factory, media: counter.attach(media))
        mounts.add_factory(args.record_path, record)

    factories = [f for f in (live, record) if f is not None]
    if args.user:
        require_auth(server, factories, args.user, password or "", args.auth)

    if args.tls_cert:
        auth = server.get_auth()
        if auth is None:  # TLS without users: everyone may play and record
            auth = GstRtspServer.RTSPAuth()
            auth.set_default_token(_token("anonymous"))
            _allow(factories, "anonymous")
        auth.set_tls_certificate(Gio.TlsCertificate.new_from_file(args.tls_cert))
        server.set_auth(auth)

    if server.attach(None) == 0:
        print(f"ERROR cannot listen on {args.host}:{args.port}", flush=True)
        return 1
    print(f"READY {server.get_bound_port()}", flush=True)

    loop = GLib.MainLoop()
    GLib.unix_signal_add(GLib.PRIORITY_DEFAULT, signal.SIGTERM, loop.quit)
    GLib.unix_signal_add(GLib.PRIORITY_DEFAULT, signal.SIGINT, loop.quit)

    last = [0]

    def report() -> bool:
        if counter.frames != last[0]:
            last[0] = counter.frames
            print(f"RECORD {counter.frames}", flush=True)
        return True

    GLib.timeout_add_seconds(1, report)
    loop.run()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
