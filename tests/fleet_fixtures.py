"""Result rows as an agent would send them (crop, inspection, livestock), for the coordinator's fleet tests."""

from __future__ import annotations

import hashlib
from typing import Any

import orjson

from edge_agent.coordinator.store import ResultRow


def body(kind: str, **sector: Any) -> dict[str, Any]:
    label = sector.get("label") or sector.get("verdict") or "cow"
    return {"kind": kind, "model": "m", "model_version": "1", "predictions": [{"label": label, "score": 0.9}],
            "sector": sector}


def crop(disease: str | None, *, healthy: bool = False) -> dict[str, Any]:
    label = disease or "Bean___healthy"
    return body("crop", label=label, recognised=True, healthy=healthy or disease is None, confidence=0.9)


def inspection(fail: bool) -> dict[str, Any]:
    return body("inspection", verdict="fail" if fail else "pass", passed=not fail)


def livestock(in_frame: int) -> dict[str, Any]:
    return body("livestock", in_frame=in_frame, counts={"unique": in_frame})


def result_row(device: str, seq: int, created_at: float, result_body: dict[str, Any], pipeline: str = "p",
               epoch: str = "e1") -> ResultRow:
    rid = hashlib.sha256(f"{device}|{epoch}|{seq}".encode()).hexdigest()[:32]
    payload = {"v": 1, "kind": "result", "device": device, "epoch": epoch, "base": 1, "result_id": rid, "seq": seq,
               "input_id": f"i{seq}", "pipeline": pipeline, "model": "m", "model_version": "1",
               "created_at": created_at, "sent_at": created_at, "body": result_body}
    return ResultRow(result_id=rid, device=device, epoch=epoch, seq=seq, base=1, input_id=f"i{seq}",
                     pipeline=pipeline, model="m", model_version="1", created_at=created_at,
                     received_at=created_at + 0.5, payload=orjson.dumps(payload))
