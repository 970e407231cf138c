#!/usr/bin/env bash
# Installs the Debian packages edge-agent's tests and demo need, only when missing.
set -euo pipefail
need=()
command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ] || need+=(mosquitto)
command -v mosquitto_sub >/dev/null 2>&1 || need+=(mosquitto-clients)
# the coordinator's PostgreSQL store tests start a private server with initdb/pg_ctl on a free port
command -v initdb >/dev/null 2>&1 || compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null || need+=(postgresql)
# the farmer-page browser test drives Debian's Chromium (Playwright with executable_path; never `playwright install`)
[ -x /usr/bin/chromium ] || need+=(chromium)
[ -x /usr/bin/chromedriver ] || need+=(chromium-driver)
# the farmer page uses the phone's own fonts (no web font): its Hindi test renders with a system Devanagari font
fc-list :lang=hi 2>/dev/null | grep -q . || need+=(fonts-lohit-deva)
# the RTSP camera test serves a stream with GStreamer's RTSP server from the system Python (tests/support/rtsp_camera.py)
[ -x /usr/bin/python3 ] && /usr/bin/python3 -c 'import gi; gi.require_version("GstRtspServer", "1.0")' >/dev/null 2>&1 \
  || need+=(python3-gi gir1.2-gst-rtsp-server-1.0)
compgen -G '/usr/lib/*/gstreamer-1.0/libgstvideotestsrc.so' >/dev/null || need+=(gstreamer1.0-plugins-base)
compgen -G '/usr/lib/*/gstreamer-1.0/libgstrtp.so' >/dev/null && compgen -G '/usr/lib/*/gstreamer-1.0/libgstjpeg.so' >/dev/null \
  || need+=(gstreamer1.0-plugins-good)
if [ ${#need[@]} -gt 0 ]; then
  echo "installing system packages: ${need[*]}"
  if [ "$(id -u)" -eq 0 ]; then SUDO=""; else SUDO="sudo"; fi
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -q
  $SUDO apt-get install -y -q --no-install-recommends "${need[@]}"
fi
