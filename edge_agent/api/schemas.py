"""Response models of the HTTP API (they make the OpenAPI document exact)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class _Out(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ErrorDetail(_Out):
    code: str = Field(description="Stable machine-readable code, e.g. image_unsupported_format, rate_limited.")
    message: str = Field(description="Human-readable explanation (English).")


class ErrorBody(_Out):
    error: ErrorDetail


class Alternative(_Out):
    label: str = Field(description="Model label, '<Crop>___<condition>'.")
    crop: str | None = Field(description="Crop id from the label, e.g. Apple.")
    crop_name: str | None = Field(description="Crop name in the requested language.")
    name: str = Field(description="Diagnosis name in the requested language.")
    healthy: bool
    confidence: float = Field(ge=0.0, le=1.0)


class Diagnosis(Alternative):
    recognised: bool = Field(description="False: not a recognised leaf of a known crop.")
    condition: str | None = Field(description="Condition part of the label, e.g. Apple_scab or healthy.")


class AdviceOut(_Out):
    description: str
    now: list[str] = Field(description="What to do now, one step per item.")
    prevention: list[str] = Field(description="How to prevent it next time.")


class RetakeOut(_Out):
    code: Literal["too_dark", "too_bright", "blurry", "leaf_too_small"] = Field(description="The failed photo check.")
    hint: str = Field(description="How to take a better photo, in the answer's language.")


class KnownCrop(_Out):
    crop: str = Field(description="Crop id, e.g. Pepper_bell.")
    crop_name: str = Field(description="Crop name in the answer's language.")


Band = Literal["diagnosis", "unsure", "unknown_plant", "retake"]


class DiagnosisResponse(_Out):
    status: Literal["done"] = "done"
    id: str = Field(description="Result id (deterministic from device, input and model version).")
    input_id: str = Field(description="Id of the accepted upload.")
    seq: int = Field(description="Per-device result sequence number.")
    created_at: float = Field(description="Unix time the result was stored.")
    model: str
    model_version: str
    language: str = Field(description="Language of names and advice (best match of the request).")
    diagnosis: Diagnosis
    alternatives: list[Alternative] = Field(description="Top 3 labels, best first (may include the diagnosis).")
    advice: AdviceOut | None = Field(description="Advice for the diagnosis; null when none is known.")
    disclaimer: str = Field(description="Guidance, not a substitute for a local extension officer.")
    crop_hint: str | None = Field(default=None, description="The crop the farmer said it is, if given.")
    crop_hint_applied: bool = Field(default=False, description="True when the hint re-ranked the alternatives.")
    timings_ms: dict[str, float] = Field(description="Model stage timings in ms.")
    band: Band = Field(
        default="diagnosis",
        description="diagnosis; unsure (the top two in alternatives, advise a retake); unknown_plant (not a crop "
        "the model knows: known_crops lists those it does); retake (the photo failed a quality check: see retake).",
    )
    known_crops: list[KnownCrop] = Field(default_factory=list, description="band unknown_plant: the crops known.")
    retake: RetakeOut | None = Field(default=None, description="band retake: which check failed and what to do.")


class PendingResponse(_Out):
    status: Literal["pending"] = "pending"
    input_id: str = Field(description="Id of the accepted upload; poll GET /v1/results/{input_id}.")
    location: str = Field(description="Where the result will be.")


class ModelInfo(BaseModel):
    model_config = ConfigDict(extra="allow")

    name: str
    version: str
    task: str
    labels: list[str] = Field(default_factory=list)
    license: str | None = None


class ModelsResponse(_Out):
    models: list[ModelInfo]
    upload_pipeline: str = Field(description="Pipeline that receives photos posted to /v1/diagnose.")
    languages: list[str] = Field(description="Languages of names and advice.")


class Health(_Out):
    status: Literal["ok"] = "ok"


class Ready(_Out):
    status: Literal["ready", "not_ready"]
    detail: dict[str, Any] = Field(default_factory=dict)


class FeedbackRequest(_Out):
    """An operator's word on one inspected part (``POST /v1/feedback``)."""

    result_id: str = Field(pattern=r"^[A-Za-z0-9_.:\-]{1,128}$",
                           description="The part's result id (or its input id, or the part id its trigger gave).")
    kind: Literal["false_reject", "missed_defect"] = Field(
        description="false_reject: the part was rejected but is good; missed_defect: it passed but has a defect.")
    operator: str | None = Field(default=None, max_length=64, description="Who says so (name or badge).")
    note: str | None = Field(default=None, max_length=500, description="Free text, e.g. 'glare on the edge'.")


class FeedbackRecord(BaseModel):
    model_config = ConfigDict(extra="allow")
    result_id: str
    input_id: str
    pipeline: str
    kind: Literal["false_reject", "missed_defect"]
    verdict: str | None = Field(description="The verdict the agent gave: pass or fail.")
    score: float | None
    threshold: float | None = Field(description="The anomaly threshold in force (anomaly models).")
    model: str
    model_version: str
    operator: str | None
    note: str | None
    at: float = Field(description="When the feedback was stored (Unix seconds).")
    image: str = Field(description="The part's image, relative to <state_dir>/feedback/.")


class FeedbackResponse(_Out):
    stored: bool = Field(description="False when the same feedback on this part was stored before.")
    duplicate: bool
    replaced: str | None = Field(default=None, description="The earlier kind this feedback replaced, if any.")
    feedback: FeedbackRecord
