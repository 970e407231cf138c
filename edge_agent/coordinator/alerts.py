"""Alert rules at the coordinator: pure state machines fed with results and device updates. No I/O.

Four rules (configured under ``alerts:``, see docs/coordinator.md):

- ``disease_outbreak``: at least ``count`` diagnoses of one disease within ``window_s`` at one site (the
  device's ``site`` under ``devices:``), or, with ``radius_km``, from devices within that distance of the
  reporting one (``lat``/``lon``). Resolves when the count falls below ``clear_below`` (default count / 2).
- ``defect_spike``: per device and pipeline (a line), the defect rate of the last ``window_s`` against the
  baseline rate of the ``baseline_s`` before it. Fires when the rate is at least ``factor`` x baseline and
  at least ``min_rate`` over ``min_samples`` parts; resolves when it is under ``clear_factor`` x baseline.
- ``headcount_drop``: per device and pipeline (a pen), the mean animals in frame over the last
  ``window_s`` against the mean of the ``baseline_s`` before it. Fires when it dropped by
  ``drop_fraction`` or more (from a baseline of at least ``min_baseline``); resolves when back within
  ``clear_fraction`` of the baseline it fired against.
- ``device_offline``: a device whose availability is ``offline``, or that sent nothing at all, for longer
  than ``after_s``. Resolves when it is heard from again.

Hysteresis: each rule resolves at a lower bar than it fires at. De-duplication: one alert per (rule,
subject) while it is firing, however often the condition is met; after it resolved, the same subject
fires again only ``cooldown_s`` later. Duplicated results (at-least-once delivery) are counted once by
their ``result_id`` (the last ``SEEN_KEEP`` ids are remembered). Every window keeps running counts and sums,
so a result costs O(1) per rule (an outbreak: O(devices at the site)), whatever the window's length.

Every change is an alert object (schema ``edge_agent/protocol/schemas/alert.json``): ``firing`` when
raised, the same ``id`` with ``resolved`` when cleared.
"""

from __future__ import annotations

import hashlib
import math
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from edge_agent.coordinator.summary import Summary

SEEN_KEEP = 100_000
"""How many result ids the engine remembers to count a re-delivered result once."""
MAX_POINTS = 100_000
"""Per rule and subject at most this many observations are kept (bounded memory)."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DeviceMeta(_Strict):
    site: str | None = Field(None, max_length=128, description="Site (farm, plant) the device is at.")
    lat: float | None = Field(None, ge=-90, le=90, description="Latitude, degrees.")
    lon: float | None = Field(None, ge=-180, le=180, description="Longitude, degrees.")
    line: str | None = Field(None, max_length=128, description="Production line (inspection devices).")
    pen: str | None = Field(None, max_length=128, description="Pen or barn (livestock devices).")


class OutbreakRule(_Strict):
    enabled: bool = True
    count: int = Field(5, ge=1, description="Diagnoses of one disease that raise the alert.")
    window_s: float = Field(86_400.0, gt=0, description="Time window the diagnoses are counted in.")
    radius_km: float | None = Field(None, gt=0, description="Count devices within this distance instead of one site.")
    clear_below: int | None = Field(None, ge=1, description="Resolves below this count (default: count / 2).")


class DefectSpikeRule(_Strict):
    enabled: bool = True
    window_s: float = Field(600.0, gt=0, description="Recent window whose defect rate is judged.")
    baseline_s: float = Field(86_400.0, gt=0, description="Baseline window before the recent one.")
    factor: float = Field(2.0, gt=1, description="Fires at this multiple of the baseline rate.")
    min_rate: float = Field(0.05, ge=0, le=1, description="... and at least this defect rate.")
    min_samples: int = Field(20, ge=1, description="... over at least this many parts in the window.")
    clear_factor: float = Field(1.2, ge=0, description="Resolves under this multiple of the baseline rate.")


class HeadcountDropRule(_Strict):
    enabled: bool = True
    window_s: float = Field(300.0, gt=0, description="Recent window (mean animals in frame).")
    baseline_s: float = Field(3_600.0, gt=0, description="Baseline window before the recent one.")
    drop_fraction: float = Field(0.2, gt=0, lt=1, description="Fires when the count dropped by this fraction.")
    clear_fraction: float = Field(0.1, ge=0, lt=1, description="Resolves when within this fraction of the baseline.")
    min_baseline: float = Field(3.0, ge=0, description="No alert below this baseline headcount.")


class OfflineRule(_Strict):
    enabled: bool = True
    after_s: float = Field(300.0, gt=0, description="Offline or silent this long raises the alert.")


class AlertsConfig(_Strict):
    enabled: bool = Field(True, description="Evaluate alert rules.")
    tick_s: float = Field(5.0, gt=0, le=3600, description="How often time-based rules are re-evaluated.")
    cooldown_s: float = Field(600.0, ge=0, description="A resolved alert's subject fires again only after this.")
    disease_outbreak: OutbreakRule = Field(default_factory=OutbreakRule)
    defect_spike: DefectSpikeRule = Field(default_factory=DefectSpikeRule)
    headcount_drop: HeadcountDropRule = Field(default_factory=HeadcountDropRule)
    device_offline: OfflineRule = Field(default_factory=OfflineRule)


Rule = Literal["disease_outbreak", "defect_spike", "headcount_drop", "device_offline"]
SEVERITY: dict[str, str] = {
    "disease_outbreak": "critical", "defect_spike": "warning",
    "headcount_drop": "critical", "device_offline": "warning",
}


def distance_km(lat1: float, lon1: float, lat2: float, lon2: float) -> float:
    """Great-circle distance (haversine, mean Earth radius)."""
    p1, p2 = math.radians(lat1), math.radians(lat2)
    a = math.sin((p2 - p1) / 2) ** 2 + math.cos(p1) * math.cos(p2) * math.sin(math.radians(lon2 - lon1) / 2) ** 2
    return 2 * 6371.0088 * math.asin(min(1.0, math.sqrt(a)))


class Window:
    """Values in time order with a running count and sum; ``drop_before`` ages them out in O(1) each.

    Values are expected in about ``created_at`` order (one device's results are); a late one is kept
    until it is the oldest. At most ``MAX_POINTS`` are kept."""

    __slots__ = ("points", "total")

    def __init__(self) -> None:
        self.points: deque[tuple[float, float]] = deque()
        self.total = 0.0

    def add(self, ts: float, value: float) -> None:
        self.points.append((ts, value))
        self.total += value
        if len(self.points) > MAX_POINTS:
            self.total -= self.points.popleft()[1]

    def drop_before(self, cutoff: float, into: Window | None = None) -> None:
        """Remove values older than ``cutoff`` (moving them to ``into`` when given)."""
        points = self.points
        while points and points[0][0] < cutoff:
            ts, value = points.popleft()
            self.total -= value
            if into is not None:
                into.add(ts, value)
        if not points:
            self.total = 0.0  # no float drift once empty

    def __len__(self) -> int:
        return len(self.points)

    def mean(self) -> float:
        return self.total / len(self.points) if self.points else 0.0


@dataclass
class _Split:
    """A recent window and the baseline window right before it."""

    recent: Window = field(default_factory=Window)
    base: Window = field(default_factory=Window)

    def advance(self, now: float, window_s: float, baseline_s: float) -> None:
        self.recent.drop_before(now - window_s, into=self.base)
        self.base.drop_before(now - window_s - baseline_s)


@dataclass
class _Active:
    alert: dict[str, Any]
    bar: float = 0.0
    """What the rule resolves against (the baseline it fired on)."""


@dataclass
class _Device:
    state: str = "unknown"
    since: float = 0.0
    last_seen: float = 0.0


@dataclass
class AlertEngine:
    config: AlertsConfig
    devices_meta: dict[str, DeviceMeta] = field(default_factory=dict)
    _active: dict[tuple[str, str], _Active] = field(default_factory=dict)
    _resolved_at: dict[tuple[str, str], float] = field(default_factory=dict)
    _seen: OrderedDict[str, None] = field(default_factory=OrderedDict)
    _diagnoses: dict[str, dict[str, Window]] = field(default_factory=dict)
    """disease -> device -> diagnosis times"""
    _defects: dict[tuple[str, str], _Split] = field(default_factory=dict)
    _heads: dict[tuple[str, str], _Split] = field(default_factory=dict)
    _near: dict[str, tuple[list[str], str]] = field(default_factory=dict)
    _devices: dict[str, _Device] = field(default_factory=dict)

    # inputs -------------------------------------------------------------------------------------
    def observe_result(
        self, result_id: str, device: str, pipeline: str, created_at: float, summary: Summary, now: float
    ) -> list[dict[str, Any]]:
        """Feed one stored result; the alerts it raised or resolved."""
        self._heard(device, now)
        if result_id in self._seen:
            return []
        self._seen[result_id] = None
        if len(self._seen) > SEEN_KEEP:
            self._seen.popitem(last=False)
        out: list[dict[str, Any]] = []
        if summary.disease is not None and self.config.disease_outbreak.enabled:
            self._diagnoses.setdefault(summary.disease, {}).setdefault(device, Window()).add(created_at, 1.0)
            out += self._outbreak(summary.disease, device, now)
        if summary.defect is not None and self.config.defect_spike.enabled:
            self._defects.setdefault((device, pipeline), _Split()).recent.add(created_at, float(summary.defect))
            out += self._defect(device, pipeline, now)
        if summary.headcount is not None and self.config.headcount_drop.enabled:
            self._heads.setdefault((device, pipeline), _Split()).recent.add(created_at, float(summary.headcount))
            out += self._headcount(device, pipeline, now)
        return out

    def observe_device(self, device: str, ts: float, state: str | None, now: float) -> list[dict[str, Any]]:
        """Feed a status (``state``) or heartbeat (``state`` None) of a device."""
        d = self._devices.setdefault(device, _Device(since=ts, last_seen=ts))
        if state is not None and state != d.state:
            d.state, d.since = state, ts
        if state != "offline":
            d.last_seen = max(d.last_seen, ts if state is None else now)
        return self._offline(device, now)

    def tick(self, now: float) -> list[dict[str, Any]]:
        """Re-evaluate what depends on time alone (offline devices, windows emptying)."""
        out: list[dict[str, Any]] = []
        for device in list(self._devices):
            out += self._offline(device, now)
        for (rule, _), active in list(self._active.items()):
            if rule == "disease_outbreak" and isinstance(active.alert.get("disease"), str):
                out += self._outbreak(active.alert["disease"], active.alert["device"], now)
        for device, pipeline in list(self._defects):
            out += self._defect(device, pipeline, now)
        for device, pipeline in list(self._heads):
            out += self._headcount(device, pipeline, now)
        return out

    def restore(self, firing: list[dict[str, Any]]) -> None:
        """Alerts stored as firing (by an earlier run): they are not raised again while their condition holds."""
        for alert in firing:
            bar = alert.get("baseline")
            self._active[(alert["rule"], alert["subject"])] = _Active(dict(alert), float(bar) if bar else 0.0)

    def seed_device(self, device: str, state: str, since: float, last_seen: float) -> None:
        """What the store knows of a device (on start): its availability since ``since``, last heard ``last_seen``."""
        self._devices[device] = _Device(state=state, since=since, last_seen=last_seen)

    def active(self) -> list[dict[str, Any]]:
        return [a.alert for a in self._active.values()]

    # rules ----------------------------------------------------------------------------------------
    def _heard(self, device: str, now: float) -> None:
        d = self._devices.setdefault(device, _Device(since=now, last_seen=now))
        d.last_seen = max(d.last_seen, now)

    def _offline(self, device: str, now: float) -> list[dict[str, Any]]:
        rule = self.config.device_offline
        if not rule.enabled:
            return []
        d = self._devices[device]
        down_since = d.since if d.state == "offline" else d.last_seen
        down_for = now - down_since
        key = ("device_offline", device)
        if down_for > rule.after_s:
            why = "offline" if d.state == "offline" else "silent"
            return self._fire(key, now, device=device, value=round(down_for, 1), threshold=rule.after_s,
                              message=f"{device} {why} for {down_for:.0f} s (over {rule.after_s:g} s)")
        if d.state != "offline" and now - d.last_seen <= rule.after_s:
            return self._resolve(key, now, value=round(max(0.0, down_for), 1))
        return []

    def _group(self, device: str) -> tuple[list[str], str]:
        """The devices whose diagnoses count with ``device``'s, and how to say where (cached: metadata is fixed)."""
        cached = self._near.get(device)
        if cached is not None:
            return cached
        rule = self.config.disease_outbreak
        meta = self.devices_meta.get(device, DeviceMeta())
        if rule.radius_km is not None and meta.lat is not None and meta.lon is not None:
            near = [d for d, m in self.devices_meta.items() if m.lat is not None and m.lon is not None
                    and distance_km(meta.lat, meta.lon, m.lat, m.lon) <= rule.radius_km]
            where = f"within {rule.radius_km:g} km of {meta.site or device}"
        elif meta.site is not None:
            near = [d for d, m in self.devices_meta.items() if m.site == meta.site]
            where = f"site {meta.site}"
        else:
            near, where = [], f"device {device}"
        group = (sorted(set(near) | {device}), where)
        self._near[device] = group
        return group

    def _outbreak(self, disease: str, device: str, now: float) -> list[dict[str, Any]]:
        rule = self.config.disease_outbreak
        by_device = self._diagnoses.get(disease, {})
        near, where = self._group(device)
        n = 0
        for other in near:
            times = by_device.get(other)
            if times is not None:
                times.drop_before(now - rule.window_s)
                n += len(times)
        meta = self.devices_meta.get(device, DeviceMeta())
        key = ("disease_outbreak", f"{disease}@{meta.site or device}")
        if n >= rule.count:
            return self._fire(key, now, device=device, value=n, threshold=rule.count, disease=disease,
                              message=f"{n} diagnoses of {disease} at {where} within {rule.window_s:g} s")
        if n < (rule.clear_below or max(1, rule.count // 2)):
            return self._resolve(key, now, value=n)
        return []

    def _defect(self, device: str, pipeline: str, now: float) -> list[dict[str, Any]]:
        rule = self.config.defect_spike
        split = self._defects[(device, pipeline)]
        split.advance(now, rule.window_s, rule.baseline_s)
        key = ("defect_spike", f"{device}/{pipeline}")
        active = self._active.get(key)
        if not split.recent:
            return self._resolve(key, now, value=0.0) if active else []
        rate, baseline = split.recent.mean(), split.base.mean()
        if active is not None:
            if rate < max(active.bar * rule.clear_factor, rule.min_rate):
                return self._resolve(key, now, value=round(rate, 4))
            return []
        if len(split.recent) >= rule.min_samples and rate >= rule.min_rate and rate >= rule.factor * baseline:
            return self._fire(key, now, device=device, pipeline=pipeline, value=round(rate, 4),
                              threshold=round(max(rule.min_rate, rule.factor * baseline), 4),
                              baseline=round(baseline, 4), bar=baseline,
                              message=f"defect rate {rate:.1%} on {device}/{pipeline} over {len(split.recent)} parts "
                                      f"(baseline {baseline:.1%})")
        return []

    def _headcount(self, device: str, pipeline: str, now: float) -> list[dict[str, Any]]:
        rule = self.config.headcount_drop
        split = self._heads[(device, pipeline)]
        split.advance(now, rule.window_s, rule.baseline_s)
        key = ("headcount_drop", f"{device}/{pipeline}")
        active = self._active.get(key)
        if not split.recent:
            return []
        current = round(split.recent.mean(), 3)
        if active is not None:
            if current >= active.bar * (1 - rule.clear_fraction):
                return self._resolve(key, now, value=current)
            return []
        if not split.base:
            return []
        baseline = round(split.base.mean(), 3)
        if baseline >= rule.min_baseline and current <= baseline * (1 - rule.drop_fraction):
            return self._fire(key, now, device=device, pipeline=pipeline, value=current,
                              threshold=round(baseline * (1 - rule.drop_fraction), 3), baseline=baseline,
                              bar=baseline, message=f"headcount on {device}/{pipeline} fell to {current:g} "
                                                    f"from {baseline:g}")
        return []

    # de-duplication -------------------------------------------------------------------------------
    def _fire(self, key: tuple[str, str], now: float, *, message: str, value: float, threshold: float,
              device: str, pipeline: str | None = None, disease: str | None = None, baseline: float | None = None,
              bar: float = 0.0) -> list[dict[str, Any]]:
        if key in self._active:
            self._active[key].alert["value"] = value  # still firing: no new alert
            return []
        if now - self._resolved_at.get(key, -math.inf) < self.config.cooldown_s:
            return []
        rule, subject = key
        meta = self.devices_meta.get(device, DeviceMeta())
        alert: dict[str, Any] = {
            "v": 1, "kind": "alert",
            "id": hashlib.sha256(f"{rule}|{subject}|{now!r}".encode()).hexdigest()[:32],
            "rule": rule, "subject": subject, "state": "firing", "severity": SEVERITY[rule],
            "message": message, "device": device, "pipeline": pipeline, "site": meta.site, "disease": disease,
            "value": value, "threshold": threshold, "baseline": baseline,
            "started_at": now, "updated_at": now, "resolved_at": None,
        }
        self._active[key] = _Active(alert, bar)
        return [dict(alert)]

    def _resolve(self, key: tuple[str, str], now: float, *, value: float) -> list[dict[str, Any]]:
        active = self._active.pop(key, None)
        if active is None:
            return []
        self._resolved_at[key] = now
        alert = {**active.alert, "state": "resolved", "value": value, "updated_at": now, "resolved_at": now}
        return [alert]

