"""A minimal live page for the coordinator: devices, state, backlog, counts (stdlib HTTP server)."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import orjson

log = logging.getLogger(__name__)

PAGE = b"""<!doctype html><html lang="en"><head><meta charset="utf-8"><title>edge coordinator</title>
<meta name="viewport" content="width=device-width,initial-scale=1">
<style>body{font-family:system-ui,sans-serif;margin:1.5rem}table{border-collapse:collapse}
td,th{padding:.3rem .8rem;border-bottom:1px solid #ccc;text-align:left}.online{color:#070}.offline{color:#a00}</style>
</head><body><h1>Devices</h1><p id="summary">loading...</p>
<table><thead><tr><th>device</th><th>availability</th><th>agent state</th><th>backlog</th>
<th>results stored</th><th>last heartbeat</th></tr></thead><tbody id="rows"></tbody></table>
<script>
function age(ts){if(!ts)return "never";return Math.round(Date.now()/1000-ts)+" s ago"}
function cell(text,cls){const td=document.createElement("td");td.textContent=text;if(cls)td.className=cls;return td}
async function refresh(){
  try{const r=await fetch("api/devices");const data=await r.json();const body=document.getElementById("rows");
  body.replaceChildren();for(const d of data.devices){const tr=document.createElement("tr");
  tr.append(cell(d.device),cell(d.state,d.state),cell(d.agent_state??"?"),cell(d.backlog??"?"),cell(d.results),
  cell(age(d.last_heartbeat)));body.append(tr)}
  document.getElementById("summary").textContent=data.devices.length+" devices, "+data.counters.inserted+
  " results stored this run, "+data.counters.duplicates+" duplicates ignored";}catch(e){}
}
refresh();setInterval(refresh,2000);
</script></body></html>"""


class Dashboard:
    def __init__(self, bind: str, port: int, data: Callable[[], dict[str, Any]]) -> None:
        self._data = data
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path in ("/", "/index.html"):
                    self._send(200, "text/html; charset=utf-8", PAGE)
                elif self.path == "/api/devices":
                    self._send(200, "application/json", orjson.dumps(outer._data()))
                elif self.path == "/healthz":
                    self._send(200, "application/json", b'{"ok":true}')
                else:
                    self._send(404, "text/plain", b"not found")

            def _send(self, code: int, ctype: str, body: bytes) -> None:
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Cache-Control", "no-store")
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                log.debug("dashboard: %s", format % args)

        self.server = ThreadingHTTPServer((bind, port), Handler)
        self.port = int(self.server.server_address[1])
        self._thread = threading.Thread(target=self.server.serve_forever, name="dashboard", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
