"""The one module that imports OpenCV: a :class:`~edge_agent.flow.sources.camera.Capture` over ``cv2.VideoCapture``.

Device indices (``"0"``), files and stream URLs (RTSP, HTTP MJPEG) are opened with FFmpeg or V4L2,
with open and read timeouts so a dead camera never hangs the reader thread forever.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import cv2

from edge_agent.types import U8Image

log = logging.getLogger(__name__)


class OpenCvCapture:
    def __init__(self, url: str, *, open_timeout_ms: int = 10_000, read_timeout_ms: int = 10_000) -> None:
        self._target: int | str = int(url) if url.isdigit() else url
        self._params = [
            cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, open_timeout_ms,
            cv2.CAP_PROP_READ_TIMEOUT_MSEC, read_timeout_ms,
        ]
        self._cap: Any = None

    def open(self) -> bool:
        # FFmpeg writes its own errors to stderr, sometimes with the stream URL: keep it quiet (it can
        # carry credentials); our reconnect loop logs the redacted URL instead.
        os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")
        try:
            self._cap = cv2.VideoCapture(self._target, cv2.CAP_ANY, self._params)
        except cv2.error:
            log.debug("VideoCapture raised", exc_info=False)  # its message may echo the URL: not logged
            self._cap = None
            return False
        return bool(self._cap.isOpened())

    def read(self) -> tuple[bool, U8Image | None]:
        if self._cap is None:
            return False, None
        try:
            ok, frame = self._cap.read()
        except cv2.error:
            return False, None
        if not ok or frame is None or frame.ndim != 3 or frame.shape[2] != 3:
            return False, None
        return True, frame

    def release(self) -> None:
        if self._cap is not None:
            self._cap.release()
            self._cap = None


def opencv_capture(url: str) -> OpenCvCapture:
    """A ``CaptureFactory`` for :class:`~edge_agent.flow.sources.camera.CameraSource`."""
    return OpenCvCapture(url)
