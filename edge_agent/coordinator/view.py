"""The fleet as the dashboard shows it: latest results and the managers' charts. Pure: no I/O.

Fed with every committed result (a re-delivered one is counted once by its id), bounded in memory:

- ``latest``: the newest ``LATEST`` results with their headline verdict;
- ``diagnoses``: diagnoses per UTC day, site and disease (the last ``DAYS`` days);
- ``defect_rate``: per line (the device's ``line``, else device/pipeline) parts and failed parts over the
  last ``DEFECT_WINDOW_S``;
- ``headcount``: per pen (the device's ``pen``, else device/pipeline) the latest animals in frame.
"""

from __future__ import annotations

import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any

from edge_agent.coordinator.alerts import DeviceMeta, Window
from edge_agent.coordinator.summary import Summary

LATEST = 30
DAYS = 7
DEFECT_WINDOW_S = 3600.0
SEEN_KEEP = 50_000


@dataclass
class FleetView:
    devices_meta: dict[str, DeviceMeta] = field(default_factory=dict)
    latest: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=LATEST))
    diagnoses: dict[tuple[str, str, str], int] = field(default_factory=dict)
    _defects: dict[str, Window] = field(default_factory=dict)
    headcount: dict[str, dict[str, Any]] = field(default_factory=dict)
    _seen: OrderedDict[str, None] = field(default_factory=OrderedDict)

    def add(self, result_id: str, device: str, pipeline: str, created_at: float, summary: Summary) -> None:
        if result_id in self._seen:
            return
        self._seen[result_id] = None
        if len(self._seen) > SEEN_KEEP:
            self._seen.popitem(last=False)
        meta = self.devices_meta.get(device, DeviceMeta())
        self.latest.appendleft({
            "result_id": result_id, "device": device, "pipeline": pipeline, "created_at": created_at,
            "kind": summary.kind, "verdict": summary.headline, "confidence": summary.confidence,
            "defect": summary.defect, "disease": summary.disease,
        })
        if summary.disease is not None:
            day = time.strftime("%Y-%m-%d", time.gmtime(created_at))
            key = (day, meta.site or device, summary.disease)
            self.diagnoses[key] = self.diagnoses.get(key, 0) + 1
        if summary.defect is not None:
            line = meta.line or f"{device}/{pipeline}"
            self._defects.setdefault(line, Window()).add(created_at, float(summary.defect))
        if summary.headcount is not None:
            pen = meta.pen or f"{device}/{pipeline}"
            current = self.headcount.get(pen)
            if current is None or created_at >= current["ts"]:
                self.headcount[pen] = {"pen": pen, "count": summary.headcount, "ts": created_at}

    def charts(self, now: float) -> dict[str, Any]:
        first_day = time.strftime("%Y-%m-%d", time.gmtime(now - (DAYS - 1) * 86400))
        for key in [k for k in self.diagnoses if k[0] < first_day]:
            del self.diagnoses[key]
        lines = []
        for line, window in sorted(self._defects.items()):
            window.drop_before(now - DEFECT_WINDOW_S)
            lines.append({"line": line, "parts": len(window), "failed": round(window.total),
                          "rate": round(window.mean(), 4) if window else None})
        return {
            "diagnoses": [
                {"day": d, "site": s, "disease": x, "count": n} for (d, s, x), n in sorted(self.diagnoses.items())
            ],
            "defect_rate": lines,
            "headcount": [self.headcount[k] for k in sorted(self.headcount)],
        }
