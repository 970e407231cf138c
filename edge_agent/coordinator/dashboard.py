"""A minimal live page for the coordinator: devices, state, backlog, counts (stdlib HTTP server).

``/api/devices`` is the page's JSON (devices, counters, the newest dead letters); ``/metrics`` is the
Prometheus text format of the coordinator's counters when a ``metrics`` source is given::

    edge_coordinator_messages_total                      counter  messages received from the broker
    edge_coordinator_results_inserted_total              counter  results stored (first time)
    edge_coordinator_duplicates_total                    counter  results already stored (at-least-once)
    edge_coordinator_dead_letters_total{reason}          counter  messages quarantined, by reason code
    edge_coordinator_dropped_total                       counter  messages not even quarantinable
    edge_coordinator_acks_sent_total                     counter  end-to-end acks published
    edge_coordinator_store_errors_total                  counter  failed store attempts (retried)
    edge_coordinator_store_up                            gauge    0 while the store is unavailable
    edge_coordinator_mqtt_connected                      gauge
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import orjson
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST

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
  " results stored this run, "+data.counters.duplicates+" duplicates ignored, "+
  data.counters.dead_letters+" messages quarantined"+(data.counters.store_ok?"":", STORE UNAVAILABLE");}catch(e){}
}
refresh();setInterval(refresh,2000);
</script></body></html>"""


_COUNTERS = (
    ("received", "edge_coordinator_messages_total", "Messages received from the broker."),
    ("inserted", "edge_coordinator_results_inserted_total", "Results stored (first time)."),
    ("duplicates", "edge_coordinator_duplicates_total", "Results already stored (at-least-once delivery)."),
    ("dropped", "edge_coordinator_dropped_total", "Messages that could not even be quarantined."),
    ("acks_sent", "edge_coordinator_acks_sent_total", "End-to-end acks published."),
    ("store_errors", "edge_coordinator_store_errors_total", "Failed store attempts (retried with backoff)."),
)


class CoordinatorCollector:
    """Prometheus collector reading the coordinator's ``snapshot()`` at scrape time."""

    def __init__(self, snapshot: Callable[[], dict[str, Any]]) -> None:
        self._snapshot = snapshot

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        snap = self._snapshot()
        for key, name, doc in _COUNTERS:
            yield CounterMetricFamily(name, doc, value=float(snap.get(key, 0)))
        dead = CounterMetricFamily(
            "edge_coordinator_dead_letters_total", "Messages quarantined, by reason code.", labels=["reason"]
        )
        for reason, count in sorted(snap.get("dead_letter_reasons", {}).items()):
            dead.add_metric([reason], float(count))
        yield dead
        yield GaugeMetricFamily("edge_coordinator_store_up", "0 while the store is unavailable.",
                                value=1.0 if snap.get("store_ok") else 0.0)
        yield GaugeMetricFamily("edge_coordinator_mqtt_connected", "1 when connected to the broker.",
                                value=1.0 if snap.get("connected") else 0.0)


class Dashboard:
    def __init__(
        self,
        bind: str,
        port: int,
        data: Callable[[], dict[str, Any]],
        metrics: Callable[[], dict[str, Any]] | None = None,
    ) -> None:
        self._data = data
        self.registry: CollectorRegistry | None = None
        if metrics is not None:
            self.registry = CollectorRegistry()
            self.registry.register(CoordinatorCollector(metrics))
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path in ("/", "/index.html"):
                    self._send(200, "text/html; charset=utf-8", PAGE)
                elif self.path == "/api/devices":
                    try:
                        body = orjson.dumps(outer._data())
                    except Exception as exc:  # the store may be unavailable: say so, keep serving
                        log.warning("dashboard: cannot read the store: %s", exc)
                        self._send(503, "application/json", orjson.dumps({"error": "store_unavailable"}))
                        return
                    self._send(200, "application/json", body)
                elif self.path == "/metrics" and outer.registry is not None:
                    self._send(200, CONTENT_TYPE_LATEST, generate_latest(outer.registry))
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
