"""A real RTSP camera for tests: GStreamer's RTSP server (Debian's gir1.2-gst-rtsp-server-1.0), MJPEG over RTP.

Run with the system Python, which has the GObject bindings (``/usr/bin/python3 tests/support/rtsp_camera.py PORT
LEVEL``): serves ``rtsp://127.0.0.1:PORT/cam``, 160x120 frames of grey ``LEVEL`` at 25 frames/s, until killed.
``scripts/install-system-deps.sh`` installs what it needs.
"""

import sys

import gi

gi.require_version("Gst", "1.0")
gi.require_version("GstRtspServer", "1.0")
from gi.repository import GLib, Gst, GstRtspServer  # noqa: E402


def main(port: str, level: int) -> None:
    Gst.init(None)
    server = GstRtspServer.RTSPServer()
    server.set_address("127.0.0.1")
    server.set_service(port)
    factory = GstRtspServer.RTSPMediaFactory()
    argb = 0xFF000000 | level << 16 | level << 8 | level
    factory.set_launch(
        f"( videotestsrc is-live=true pattern=solid-color foreground-color={argb} "
        "! video/x-raw,format=I420,width=160,height=120,framerate=25/1 ! jpegenc ! rtpjpegpay name=pay0 pt=26 )"
    )
    factory.set_shared(True)
    server.get_mount_points().add_factory("/cam", factory)
    if server.attach(None) == 0:
        sys.exit(f"cannot listen on 127.0.0.1:{port}")
    GLib.MainLoop().run()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
