"""The agent's configuration: strict, documented, frozen.

Loaded in layers (see ``load_config``): read the file, parse YAML with PyYAML's safe loader (tags
such as ``!!python/object`` fail; so does a key given twice, which PyYAML would silently keep the last
of), validate with pydantic (``extra="forbid"``: unknown keys fail), check the few paths that must exist
(certificates) or be writable (state directory, watched folders), and resolve secrets from a file or an
environment variable into ``SecretStr`` values that never print.

Every error is one ``ConfigError`` line: ``<file>: <key.path>: <message>``.

Paths are data here: the service creates directories, validators never do.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections import deque
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SecretStr,
    Strict,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic.json_schema import SkipJsonSchema

from edge_agent.errors import ConfigError
from edge_agent.protocol.commands import KNOWN_COMMANDS, CommandPolicy

_NAME = r"^[a-z0-9][a-z0-9_\-]{0,63}$"
_UNITS = {"": 1, "b": 1, "kb": 1000, "mb": 1000**2, "gb": 1000**3, "kib": 1024, "mib": 1024**2, "gib": 1024**3}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmg]i?b|b)?\s*$", re.IGNORECASE)


def _parse_size(value: Any) -> Any:
    """Accept ``512MB``, ``16 MiB`` or a plain integer of bytes."""
    if isinstance(value, str):
        match = _SIZE_RE.match(value)
        if not match:
            raise ValueError(f"not a byte size: {value!r} (use e.g. 512MB or 16MiB)")
        number, unit = match.groups()
        return int(float(number) * _UNITS[(unit or "").lower()])
    return value


ByteSize = Annotated[int, BeforeValidator(_parse_size), Field(gt=0)]
ByteSizeOrZero = Annotated[int, BeforeValidator(_parse_size), Field(ge=0)]
Port = Annotated[int, Field(ge=1, le=65535)]
Name = Annotated[str, Field(pattern=_NAME)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# --- models and pipelines -----------------------------------------------------------------------------------------


class ModelConfig(_Strict):
    name: Name = Field(description="Name that pipelines use to refer to this model.")
    bundle: str = Field(
        min_length=1,
        description="Bundle folder under models_dir: its name (or its manifest's name), a relative path below "
        "models_dir, or an absolute path inside it. Anything that resolves outside models_dir is refused.",
    )
    threads: int = Field(default=1, ge=1, le=64, description="onnxruntime intra-op threads per session.")
    providers: tuple[str, ...] = Field(
        default=("CPUExecutionProvider",),
        min_length=1,
        description="onnxruntime execution providers in order of preference; unavailable ones are skipped.",
    )
    warmup: bool = Field(default=True, description="Run one inference before the model is reported ready.")
    score_threshold: float | None = Field(
        default=None, ge=0.0, le=1.0,
        description="Detectors only: replaces the bundle's score threshold (null: the bundle's). Lower it so a "
        "livestock pipeline's tracker sees the low-score detections that keep a half-hidden animal's track alive.",
    )
    max_pixels: int = Field(
        default=40_000_000,
        gt=0,
        description="Images from any source (upload, folder) with more pixels are refused, judged from the header "
        "before any pixel is decoded (error code image_too_large).",
    )

    @field_validator("bundle")
    @classmethod
    def _bundle_stays_inside(cls, v: str) -> str:
        if "\x00" in v or ".." in Path(v).parts or v.strip() != v:
            raise ValueError(f"{v!r}: a bundle is a folder under models_dir ('..' is not allowed)")
        return v


class PhotoQualityOptions(_Strict):
    """Photo checks before a crop diagnosis (``edge_agent.vision.quality``): a photo that fails one gets a retake
    hint instead of a diagnosis. Thresholds left null take the defaults measured on PlantVillage and iBean
    (``docs/photo-quality.md``)."""

    enabled: bool = Field(default=True, description="Check blur, exposure and leaf size before diagnosing.")
    min_brightness: float | None = Field(default=None, ge=0, le=255, description="Mean luma below this: too dark.")
    max_brightness: float | None = Field(default=None, ge=0, le=255, description="Mean luma above this: too bright.")
    max_clipped: float | None = Field(
        default=None, ge=0, le=1, description="Fraction of burnt-out pixels (luma >= 250) above this: too bright."
    )
    min_sharpness: float | None = Field(
        default=None, ge=0, description="Laplacian variance / grey variance below this: blurry."
    )
    min_leaf_fraction: float | None = Field(
        default=None, ge=0, le=1, description="Fraction of leaf-coloured pixels below this: leaf too small."
    )

    def thresholds(self) -> dict[str, float]:
        """The thresholds set here (the rest keep their measured defaults)."""
        return {k: v for k, v in self.model_dump(exclude={"enabled"}).items() if v is not None}


class ChainOptions(_Strict):
    """A defect-type classifier run after the pass/fail decision, on failed parts only (``inspection.classify``)."""

    model: Name = Field(description="Name of an entry in models: a classifier (e.g. steel_defects).")
    min_score: float = Field(
        default=0.0, ge=0.0, le=1.0,
        description="Below this score the defect type is reported as 'unknown' (the part still fails).",
    )
    top_k: int = Field(default=3, ge=1, le=10, description="Candidates listed with the defect type.")


class InspectionOptions(_Strict):
    fail_labels: tuple[str, ...] = Field(
        default=(),
        description="Classifier/detector labels that mean a defect. Empty: every label except pass_labels fails.",
    )
    pass_labels: tuple[str, ...] = Field(
        default=("good", "ok", "pass", "normal"), description="Labels that mean a good part."
    )
    min_score: float = Field(
        default=0.5, ge=0.0, le=1.0, description="A defect prediction below this score does not fail the part."
    )
    fail_when_rejected: bool = Field(
        default=True, description="Fail a part whose image the model rejected as out of its domain."
    )
    reject_signal: str = Field(
        default="reject", min_length=1, max_length=64, description="Name of the signal emitted for a failed part."
    )
    heatmap: Literal["never", "failed", "always"] = Field(
        default="never",
        description="Add a PNG thumbnail of the anomaly heat map (base64) to the verdict of failed parts or of every "
        "part (anomaly models with a map).",
    )
    heatmap_max_side: int = Field(default=64, ge=8, le=256, description="Longest side of the thumbnail, pixels.")
    heatmap_max_bytes: int = Field(
        default=8192, ge=256, le=65536, description="Upper bound on the PNG size; the thumbnail shrinks to fit."
    )
    classify: ChainOptions | None = Field(
        default=None,
        description="Chain: run this classifier on failed parts and report its top label as the defect type.",
    )
    keep_images: int = Field(
        default=200, ge=0, le=100_000,
        description="Keep the images of this many recent parts under <state_dir>/inspected/<pipeline>/, so that an "
        "operator's feedback (false_reject / missed_defect) can store the part's image; 0: keep none.",
    )
    keep_max_bytes: int = Field(
        default=64 * 1024 * 1024, ge=0,
        description="At most this many bytes of recent images per pipeline (the oldest go first).",
    )

    def rules(self) -> dict[str, Any]:
        """The options that decide pass or fail (``sectors.inspection.InspectionRules``)."""
        return self.model_dump(exclude={"keep_images", "keep_max_bytes", "classify"})


ExpectedCount = Annotated[int, Strict(), Field(ge=1)] | Literal["learn"] | None
"""A headcount to watch for a drop: a number of animals, ``learn`` (the recent maximum), or null (not watched)."""


class Zone(_Strict):
    name: Name = Field(description="Zone name reported in alerts.")
    box: tuple[float, float, float, float] = Field(
        description="x1, y1, x2, y2 as fractions (0..1) of the image width and height."
    )
    max_count: int | None = Field(
        default=None, ge=0, description="Alert when more tracked animals than this are inside; null: no limit."
    )
    alert_on_enter: bool = Field(default=False, description="Alert whenever a tracked animal enters the zone.")
    expected: ExpectedCount = Field(
        default=None,
        description="Watch this zone for a headcount drop against this many animals, or 'learn' (the highest "
        "smoothed count of the last headcount_drop.baseline_s); null: not watched.",
    )

    @field_validator("box")
    @classmethod
    def _box_ok(cls, v: tuple[float, float, float, float]) -> tuple[float, float, float, float]:
        x1, y1, x2, y2 = v
        if not (0.0 <= x1 < x2 <= 1.0 and 0.0 <= y1 < y2 <= 1.0):
            raise ValueError("box must be 0 <= x1 < x2 <= 1 and 0 <= y1 < y2 <= 1")
        return v


class CountLine(_Strict):
    axis: Literal["x", "y"] = Field(
        description="x: a vertical line at x=position (counts left/right crossings); y: a horizontal line."
    )
    position: float = Field(ge=0.0, le=1.0, description="Where the line is, as a fraction of width or height.")


class StationaryOptions(_Strict):
    enabled: bool = Field(default=True, description="Raise animal_stationary (an animal down) alerts.")
    after_s: float = Field(
        default=600.0, gt=0.0, le=86_400, description="Seconds a track stays within radius before it fires."
    )
    radius: float = Field(
        default=0.05, gt=0.0, le=1.0,
        description="How far the centre may wander and still count as not moving (fraction of the frame).",
    )
    clear_radius: float = Field(
        default=0.1, gt=0.0, le=1.0, description="The alert clears once the centre is this far away (>= radius)."
    )
    clear_after_s: float = Field(
        default=5.0, ge=0.0, le=3600, description="... for this long (a moving animal, not a jittery box)."
    )
    memory_s: float = Field(
        default=60.0, ge=0.0, le=86_400,
        description="An unseen animal's spot is kept this long: a new track on it takes over its timer and alert; "
        "after that a fired alert clears with reason 'lost'.",
    )

    @model_validator(mode="after")
    def _bars(self) -> StationaryOptions:
        if self.clear_radius < self.radius:
            raise ValueError("clear_radius must be at least radius (hysteresis)")
        return self


class HeadcountDropOptions(_Strict):
    drop: int = Field(default=1, ge=1, description="Fires when the count is at or below baseline - drop ...")
    clear_drop: int = Field(
        default=0, ge=0, description="... and clears when it is back at or above baseline - clear_drop (< drop)."
    )
    after_s: float = Field(default=120.0, ge=0.0, le=86_400, description="Seconds below before it fires.")
    clear_after_s: float = Field(default=60.0, ge=0.0, le=86_400, description="Seconds restored before it clears.")
    smooth_s: float = Field(
        default=30.0, ge=0.0, le=3600, description="The count is the median of the per-frame counts of this window."
    )
    baseline_s: float = Field(
        default=3600.0, gt=0.0, le=7 * 86_400,
        description="expected: learn: the baseline is the highest smoothed count of this window.",
    )
    min_baseline: int = Field(default=1, ge=1, description="No alert while the baseline is below this.")

    @model_validator(mode="after")
    def _bars(self) -> HeadcountDropOptions:
        if self.clear_drop >= self.drop:
            raise ValueError("clear_drop must be less than drop (hysteresis)")
        return self


class LivestockOptions(_Strict):
    labels: tuple[str, ...] = Field(
        default=("cow", "horse", "sheep"), description="Detection labels that are tracked and counted."
    )
    min_score: float = Field(
        default=0.3, ge=0.0, le=1.0,
        description="Detections below this score are ignored; from here up to high_score they only keep existing "
        "tracks alive (the model must emit them: its bundle threshold applies first).",
    )
    high_score: float = Field(
        default=0.5, ge=0.0, le=1.0, description="Detections at or above this score start tracks and are matched first."
    )
    iou_threshold: float = Field(
        default=0.2, gt=0.0, le=1.0,
        description="Minimum IoU between a track's predicted box (Kalman filter) and a detection to match them.",
    )
    max_missed: int = Field(
        default=5, ge=0, description="Frames a confirmed track coasts on its predicted motion without a detection."
    )
    min_hits: int = Field(default=2, ge=1, description="Matched frames before a track is confirmed and counted.")
    count_line: CountLine | None = Field(default=None, description="Optional line whose crossings are counted.")
    zones: tuple[Zone, ...] = Field(default=(), description="Zones with occupancy limits and enter alerts.")
    report_interval_s: float = Field(
        default=60.0, ge=0.0, le=86_400,
        description="Publish a headcount report (whole frame and each zone) per interval of this many seconds of "
        "capture time; 0: none.",
    )
    expected: ExpectedCount = Field(
        default=None,
        description="Watch the whole frame for a headcount drop against this many animals, or 'learn'; null: not.",
    )
    stationary: StationaryOptions = Field(
        default_factory=StationaryOptions, description="animal_stationary: an animal that has not moved for long."
    )
    headcount_drop: HeadcountDropOptions = Field(
        default_factory=HeadcountDropOptions,
        description="headcount_drop: for the whole frame and zones with 'expected'.",
    )

    @model_validator(mode="after")
    def _unique_zones(self) -> LivestockOptions:
        names = [z.name for z in self.zones]
        if len(names) != len(set(names)):
            raise ValueError("zone names must be unique")
        return self


class PipelineConfig(_Strict):
    name: Name = Field(description="Pipeline name; also the last part of its MQTT results topic.")
    kind: Literal["crop", "inspection", "livestock", "plain"] = Field(
        description="Sector logic applied after the model: crop advice, pass/fail, tracking+counting, or none."
    )
    model: Name = Field(description="Name of an entry in models.")
    workers: int = Field(default=1, ge=1, le=16, description="Worker threads, each with its own model session.")
    queue_size: int = Field(default=16, ge=1, le=10_000, description="Bounded input queue; full means 'overloaded'.")
    inspection: InspectionOptions | None = Field(default=None, description="Options for kind=inspection.")
    livestock: LivestockOptions | None = Field(default=None, description="Options for kind=livestock.")
    quality: PhotoQualityOptions | None = Field(
        default=None, description="kind=crop: photo checks before the diagnosis (null: on, measured thresholds)."
    )

    @model_validator(mode="after")
    def _options_fit_kind(self) -> PipelineConfig:
        if self.inspection is not None and self.kind != "inspection":
            raise ValueError("inspection options need kind: inspection")
        if self.livestock is not None and self.kind != "livestock":
            raise ValueError("livestock options need kind: livestock")
        if self.quality is not None and self.kind != "crop":
            raise ValueError("quality options need kind: crop")
        return self


# --- the line: recipes, triggers, reject outputs ------------------------------------------------------------------

Fraction4 = tuple[float, float, float, float]


def _fraction_box(v: Fraction4 | None) -> Fraction4 | None:
    if v is None:
        return v
    x1, y1, x2, y2 = v
    if not (0.0 <= x1 < x2 <= 1.0 and 0.0 <= y1 < y2 <= 1.0):
        raise ValueError("roi must be 0 <= x1 < x2 <= 1 and 0 <= y1 < y2 <= 1 (fractions of width and height)")
    return v


class ModbusOutputConfig(_Strict):
    type: Literal["modbus"] = Field(description="Modbus TCP: write a coil or a holding register of a PLC.")
    name: Name = Field(description="Output name, referred to by recipes.")
    host: str = Field(min_length=1, description="PLC / Modbus TCP server address.")
    port: Port = Field(default=502, description="Modbus TCP port.")
    unit: int = Field(default=1, ge=0, le=255, description="Modbus unit (slave) id.")
    coil: int | None = Field(default=None, ge=0, le=65535, description="Coil address written (reject: 1).")
    holding_register: int | None = Field(
        default=None, ge=0, le=65535, description="Holding register address written (instead of a coil)."
    )
    reject_value: int = Field(default=1, ge=0, le=65535, description="Value written for a reject (coil: non-zero).")
    pass_value: int | None = Field(
        default=0, ge=0, le=65535, description="Value written for a pass; null: nothing is written for a pass."
    )
    pulse_ms: float | None = Field(
        default=None, gt=0.0, le=60_000,
        description="After a reject, write pass_value back after this many ms (a pulse); null: the value stays.",
    )
    timeout_s: float = Field(default=0.5, gt=0.0, le=30.0, description="Connect and response timeout per try.")
    retries: int = Field(default=1, ge=0, le=5, description="Further tries after a failed write (bounded).")

    @model_validator(mode="after")
    def _one_target(self) -> ModbusOutputConfig:
        if (self.coil is None) == (self.holding_register is None):
            raise ValueError("@coil@ set exactly one of coil or holding_register")
        if self.pulse_ms is not None and self.pass_value is None:
            raise ValueError("@pulse_ms@ a pulse writes pass_value back: set pass_value")
        return self


class WebhookOutputConfig(_Strict):
    type: Literal["webhook"] = Field(description="HTTP POST of the decision as JSON.")
    name: Name = Field(description="Output name, referred to by recipes.")
    url: str = Field(pattern=r"^https?://[^\s/?#@]+(/[^\s#]*)?$", description="Where the decision is POSTed.")
    timeout_s: float = Field(default=1.0, gt=0.0, le=30.0, description="Timeout of one request.")
    retries: int = Field(default=2, ge=0, le=5, description="Further tries after a failure (bounded).")
    token_env: str | None = Field(default=None, description="Environment variable with a bearer token to send.")
    on_pass: bool = Field(default=True, description="Also POST pass decisions (false: rejects only).")


class GpioOutputConfig(_Strict):
    type: Literal["gpio"] = Field(description="A GPIO line via libgpiod (python3-gpiod / gpiod>=2), for boards.")
    name: Name = Field(description="Output name, referred to by recipes.")
    chip: str = Field(default="/dev/gpiochip0", min_length=1, description="GPIO chip device.")
    line: int = Field(ge=0, le=1023, description="Line offset on the chip.")
    active_low: bool = Field(default=False, description="The line is active when low.")
    pulse_ms: float = Field(default=200.0, gt=0.0, le=60_000, description="How long the line is held active.")


class MqttOutputConfig(_Strict):
    type: Literal["mqtt"] = Field(description="A part_rejected event on edge/v1/<device>/events.")
    name: Name = Field(description="Output name, referred to by recipes.")
    on_pass: bool = Field(default=False, description="Also publish part_passed events.")


LineOutput = Annotated[
    ModbusOutputConfig | WebhookOutputConfig | GpioOutputConfig | MqttOutputConfig, Field(discriminator="type")
]


class RecipeConfig(_Strict):
    """One product: which pipeline (model) inspects it, how, and how fast the line needs the answer."""

    id: Name = Field(description="Recipe id, carried by triggers.")
    pipeline: Name = Field(description="An inspection pipeline: its model and inspection options are the recipe's.")
    camera: Name | None = Field(
        default=None, description="Camera source whose newest frame a trigger without an image inspects."
    )
    roi: Fraction4 | None = Field(
        default=None, description="Region of interest x1, y1, x2, y2 as fractions of the image; the rest is cut off."
    )
    anomaly_threshold: float | None = Field(
        default=None, gt=0.0, description="Anomaly threshold for this product (default: the model's own)."
    )
    min_score: float | None = Field(
        default=None, ge=0.0, le=1.0, description="Defect score threshold (default: the pipeline's min_score)."
    )
    classify: ChainOptions | None = Field(
        default=None, description="Defect-type classifier on failed parts (default: the pipeline's classify)."
    )
    deadline_ms: float = Field(
        default=500.0, gt=0.0, le=60_000,
        description="The line needs the decision this long after the trigger; later, fail_safe is signalled.",
    )
    fail_safe: Literal["reject", "pass"] = Field(
        default="reject", description="Signalled at the deadline when the verdict is late (or inference failed)."
    )
    outputs: tuple[Name, ...] | None = Field(
        default=None, description="Reject outputs that get this recipe's decisions; null: every output."
    )

    @field_validator("roi")
    @classmethod
    def _roi_inside(cls, v: Fraction4 | None) -> Fraction4 | None:
        return _fraction_box(v)


class PresenceConfig(_Strict):
    """Part-present detection: a camera frame that differs enough from the empty-belt background is a part."""

    camera: Name = Field(description="Camera source watched.")
    recipe: Name = Field(description="Recipe triggered when a part arrives.")
    enter: float = Field(
        default=12.0, gt=0.0, le=255.0,
        description="Mean absolute difference from the background (grey levels) at which a part is present.",
    )
    leave: float = Field(
        default=6.0, ge=0.0, le=255.0, description="Below this the part has left (hysteresis: leave < enter)."
    )
    settle_frames: int = Field(
        default=2, ge=1, le=100, description="Frames above enter (or below leave) in a row before it counts."
    )
    size: int = Field(default=64, ge=8, le=512, description="Frames are compared at this width (grey, downscaled).")
    background_rate: float = Field(
        default=0.05, ge=0.0, le=1.0, description="How fast the background follows an empty belt (light changes)."
    )

    @model_validator(mode="after")
    def _hysteresis(self) -> PresenceConfig:
        if self.leave >= self.enter:
            raise ValueError("@leave@ leave must be below enter (hysteresis)")
        return self


class LineConfig(_Strict):
    """The line (docs/agent.md#the-line): triggers pick a recipe, the verdict (or the fail-safe at the deadline)
    drives the reject outputs."""

    recipes: tuple[RecipeConfig, ...] = Field(default=(), description="Products and how they are inspected.")
    outputs: tuple[LineOutput, ...] = Field(default=(), description="Where decisions are signalled.")
    presence: tuple[PresenceConfig, ...] = Field(default=(), description="Part-present triggers on cameras.")
    default_recipe: Name | None = Field(default=None, description="Recipe of a trigger that names none.")
    max_pending: int = Field(
        default=64, ge=1, le=10_000, description="Decisions awaiting a verdict at most; a trigger over it gets the "
        "fail-safe at once (cause overloaded).",
    )
    priority: bool = Field(
        default=True,
        description="Triggered parts go before everything queued in their pipeline (folder, camera, upload inputs "
        "wait); false: first come, first served.",
    )


# --- sources -------------------------------------------------------------------------------------------------------


class FolderSourceConfig(_Strict):
    type: Literal["folder"] = Field(description="A watched folder of image files.")
    name: Name = Field(description="Source name, reported with every result.")
    pipeline: Name = Field(description="Pipeline that processes this source's inputs.")
    path: Path = Field(description="Folder to watch; files are moved out of it into the spool.")
    done_dir: Path | None = Field(default=None, description="Where processed files go; default <path>/done.")
    rejected_dir: Path | None = Field(
        default=None, description="Where bad files go with a <name>.reason.json; default <path>/rejected."
    )
    keep_done: bool = Field(default=True, description="Keep processed files in done_dir (false: delete them).")
    poll_interval_s: float = Field(default=1.0, gt=0.0, le=3600, description="Seconds between folder scans.")
    settle_s: float = Field(
        default=0.5, ge=0.0, le=3600, description="A file must be unmodified this long before it is taken."
    )
    extensions: tuple[str, ...] = Field(
        default=(".jpg", ".jpeg", ".png", ".webp"), min_length=1, description="Accepted file name endings."
    )
    max_file_bytes: ByteSize = Field(default=32 * 1024**2, description="Larger files are rejected unread.")
    max_in_flight: int = Field(default=8, ge=1, le=10_000, description="Files submitted but not yet finished.")


class Backoff(_Strict):
    initial_s: float = Field(default=1.0, gt=0.0, le=3600, description="First reconnect delay.")
    max_s: float = Field(default=60.0, gt=0.0, le=86_400, description="Longest reconnect delay.")
    multiplier: float = Field(default=2.0, ge=1.0, le=10.0, description="Delay growth factor per failure.")


class CameraSourceConfig(_Strict):
    type: Literal["camera"] = Field(description="A camera or RTSP/HTTP stream read with OpenCV.")
    name: Name = Field(description="Source name, reported with every result.")
    pipeline: Name = Field(description="Pipeline that processes this source's frames.")
    url: str = Field(
        min_length=1, description="Device index (e.g. '0'), file or stream URL. Credentials here are redacted in logs."
    )
    username: str | None = Field(default=None, description="Stream user name, inserted into the URL.")
    password_file: Path | None = Field(default=None, description="File holding the stream password.")
    password_env: str | None = Field(default=None, description="Environment variable holding the stream password.")
    max_fps: float = Field(default=5.0, gt=0.0, le=240, description="Frames per second submitted at most.")
    reconnect: Backoff = Field(default=Backoff(), description="Exponential backoff between reconnects.")
    read_failures: int = Field(default=3, ge=1, description="Consecutive failed reads before reconnecting.")
    max_in_flight: int = Field(
        default=2, ge=1, le=64, description="Frames submitted but unfinished; newer frames replace the waiting one."
    )
    submit_frames: bool = Field(
        default=True,
        description="Feed frames to the pipeline at max_fps. false: the camera only serves the line (triggers take "
        "its newest frame; part-present detection watches it).",
    )
    password: SkipJsonSchema[SecretStr | None] = Field(
        default=None, exclude=True, description="Resolved by the loader; never in YAML."
    )


Source = Annotated[FolderSourceConfig | CameraSourceConfig, Field(discriminator="type")]


# --- delivery, API, metrics ----------------------------------------------------------------------------------------


class TlsConfig(_Strict):
    enabled: bool = Field(default=False, description="Use TLS to the broker.")
    ca_file: Path | None = Field(default=None, description="CA bundle that signed the broker's certificate.")
    cert_file: Path | None = Field(default=None, description="Client certificate (mutual TLS).")
    key_file: Path | None = Field(default=None, description="Client private key (mutual TLS).")
    insecure: bool = Field(default=False, description="Skip host name verification (testing only).")


class MqttConfig(_Strict):
    enabled: bool = Field(default=True, description="Publish results over MQTT.")
    host: str = Field(default="localhost", min_length=1, description="Broker host name or address.")
    port: Port = Field(default=1883, description="Broker port.")
    client_id: str | None = Field(default=None, description="MQTT client id; default: the device_id.")
    username: str | None = Field(default=None, description="Broker user name (per-device credentials).")
    password_file: Path | None = Field(default=None, description="File holding the broker password.")
    password_env: str | None = Field(default=None, description="Environment variable holding the broker password.")
    keepalive_s: int = Field(default=30, ge=5, le=3600, description="MQTT keepalive in seconds.")
    tls: TlsConfig = Field(default=TlsConfig(), description="TLS settings.")
    max_inflight: int = Field(default=20, ge=1, le=1000, description="Unacknowledged QoS 1 publishes at most.")
    heartbeat_s: float = Field(default=30.0, gt=0.0, le=3600, description="Seconds between status heartbeats.")
    republish_after_s: float = Field(
        default=30.0, gt=0.0, le=86_400, description="Re-publish results not acknowledged end to end after this."
    )
    republish_rate: float = Field(default=200.0, gt=0.0, description="Re-published results per second at most.")
    reconnect_max_s: float = Field(
        default=5.0, ge=1.0, le=3600,
        description="Longest wait between broker reconnect attempts (5 s: after a broker restart the backlog drains "
        "within seconds; one CONNECT every 5 s costs a broker nothing).",
    )
    ack_keys: tuple[Path, ...] = Field(
        default=(),
        description="Ed25519 public keys (PEM) of the coordinators: acks must be signed by one of them and unexpired. "
        "Empty: acks are unauthenticated (loopback demo only; the agent warns once at start).",
    )
    result_key: Path | None = Field(
        default=None,
        description="This device's Ed25519 private key (PEM, from `edge-agent models keygen`): every result is "
        "signed with it, so a coordinator that knows the public key refuses forged results.",
    )
    max_clock_skew_s: float = Field(
        default=300.0, ge=0.0, le=86_400,
        description="Slack for the ts/exp checks of signed acks and commands, in seconds (boards without a "
        "real-time clock need NTP: a clock far off makes every signed ack look expired).",
    )
    password: SkipJsonSchema[SecretStr | None] = Field(
        default=None, exclude=True, description="Resolved by the loader; never in YAML."
    )

    @model_validator(mode="after")
    def _one_password_source(self) -> MqttConfig:
        if self.password_file is not None and self.password_env is not None:
            raise ValueError("set password_file or password_env, not both")
        return self


class OutboxConfig(_Strict):
    max_bytes: ByteSize = Field(default=512 * 1000**2, description="Byte cap of the outbox database.")
    max_age_s: float = Field(
        default=7 * 86_400, gt=0.0, description="Unacknowledged results older than this are dropped (counted)."
    )
    full_policy: Literal["reject_new", "drop_oldest"] = Field(
        default="reject_new", description="When full: refuse new inputs (uploads get 507) or drop the oldest results."
    )
    retention_s: float = Field(
        default=3600.0, ge=0.0, description="Acknowledged results are kept this long for status queries."
    )
    min_free_bytes: ByteSize = Field(
        default=32 * 1024**2,
        description="New inputs wait (folder files stay put, uploads get 507) while the state disk has less free "
        "space; they resume by themselves once it has more.",
    )
    reserve_bytes: ByteSizeOrZero = Field(
        default=4 * 1024**2,
        description="Disk space the outbox keeps allocated (<state_dir>/outbox.db.reserve) and releases when the "
        "disk is full, so acknowledged results can always be deleted; 0: none.",
    )


class HttpConfig(_Strict):
    enabled: bool = Field(default=False, description="Serve the HTTP API and farmer page.")
    bind: str = Field(default="127.0.0.1", min_length=1, description="Address to listen on.")
    port: Port = Field(default=8080, description="Port to listen on.")
    tokens_file: Path | None = Field(default=None, description="File with one API token per line; null: no auth.")
    max_body_bytes: ByteSize = Field(default=16 * 1024**2, description="Request bodies larger than this get 413.")
    rate_limit_per_minute: int = Field(default=120, ge=1, description="Requests per minute per client.")
    default_language: str = Field(
        default="en", pattern=r"^[a-z]{2}(-[A-Za-z]{2})?$", description="Language of the page and advice."
    )
    pipeline: Name | None = Field(default=None, description="Pipeline for uploads; default: the first crop one.")
    rate_limit_burst: int = Field(default=30, ge=1, description="Requests a client may make at once before 429.")
    body_timeout_s: float = Field(default=60.0, gt=0, le=3600, description="A body still arriving after this gets 408.")
    result_timeout_s: float = Field(
        default=30.0, gt=0, le=600, description="Wait this long for a diagnosis, then answer 202 with where to poll."
    )
    queue_wait_s: float = Field(
        default=15.0, ge=0, le=600, description="Wait this long for room in a full pipeline queue, then 503."
    )
    max_concurrent_uploads: int = Field(default=64, ge=1, description="Uploads in progress at once; more get 503.")
    max_connections: int = Field(
        default=256, ge=1, le=65_535,
        description="Open HTTP connections at most (all clients); a connection over the cap is answered 503 "
        "and closed at once, so a flood of idle connections never exhausts the process's file descriptors.",
    )
    max_connections_per_client: int = Field(
        default=64, ge=1, le=65_535,
        description="Open HTTP connections at most from one client address; more are answered 503 and closed.",
    )
    header_timeout_s: float = Field(
        default=10.0, gt=0, le=600,
        description="A connection whose request line and headers are not complete this long after it opened "
        "(or after its previous answer) is closed (slow or half-open clients).",
    )
    keepalive_timeout_s: float = Field(
        default=5.0, gt=0, le=600, description="An idle keep-alive connection is closed after this long."
    )
    trusted_proxies: tuple[str, ...] = Field(
        default=(),
        description="Reverse proxies (IP addresses or CIDR networks) whose X-Forwarded-For / X-Forwarded-Proto "
        "headers are believed. Empty (the default): the headers are ignored and the client is the TCP peer, so "
        "nobody can dodge the per-client rate limit by sending X-Forwarded-For.",
    )
    allowed_hosts: tuple[str, ...] | None = Field(
        default=None,
        description="Host header values served (e.g. farm-01.coop.lan, *.coop.lan; '*' turns the check off); "
        "IP literals are always served. null (the default): localhost, this machine's host name and "
        "<hostname>.local. Other names get 421 host_not_allowed (DNS rebinding).",
    )

    @field_validator("bind")
    @classmethod
    def _bind_is_an_address(cls, v: str) -> str:
        return _listen_address(v)

    @field_validator("trusted_proxies")
    @classmethod
    def _proxies_are_networks(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        for entry in v:
            try:
                ipaddress.ip_network(entry, strict=False)
            except ValueError:
                raise ValueError(f"{entry!r} is not an IP address or CIDR network") from None
        return v

    @field_validator("allowed_hosts")
    @classmethod
    def _hosts_are_names(cls, v: tuple[str, ...] | None) -> tuple[str, ...] | None:
        for entry in v or ():
            if entry != "*" and not _HOST_PATTERN.match(entry):
                raise ValueError(f"{entry!r} is not a host name or *.domain pattern")
        return v

    @model_validator(mode="after")
    def _auth_off_loopback(self) -> HttpConfig:
        if self.enabled and self.tokens_file is None and not is_loopback(self.bind):
            raise ValueError(f"@tokens_file@ required when bind ({self.bind}) is not a loopback address")
        return self


_HOST_PATTERN = re.compile(r"^(\*\.)?[A-Za-z0-9]([A-Za-z0-9\-]{0,62})(\.[A-Za-z0-9]([A-Za-z0-9\-]{0,62}))*\.?$")


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and ``localhost``."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _listen_address(v: str) -> str:
    """An address to listen on: an IP literal or ``localhost`` (a name could resolve anywhere, or nowhere)."""
    if v == "localhost":
        return v
    try:
        ipaddress.ip_address(v)
    except ValueError:
        raise ValueError(f"{v!r} is not an IP address (use e.g. 0.0.0.0, 127.0.0.1 or ::)") from None
    return v


class ThresholdBounds(_Strict):
    """Bounds of the set_thresholds command (inclusive), within the built-in ranges."""

    score_min: float = Field(default=0.05, ge=0.0, le=1.0, description="Lowest score threshold a command may set.")
    score_max: float = Field(
        default=0.95, ge=0.0, le=1.0, description="Highest score threshold a command may set (1.0 silences a detector)."
    )
    iou_min: float = Field(default=0.1, ge=0.0, le=1.0, description="Lowest NMS IoU threshold a command may set.")
    iou_max: float = Field(default=0.9, ge=0.0, le=1.0, description="Highest NMS IoU threshold a command may set.")
    anomaly_min: float = Field(default=0.0, ge=0.0, description="Lowest anomaly threshold a command may set.")
    anomaly_max: float = Field(
        default=1e9, ge=0.0, description="Highest anomaly threshold a command may set (its scale depends on the model)."
    )

    @model_validator(mode="after")
    def _ordered(self) -> ThresholdBounds:
        for name in ("score", "iou", "anomaly"):
            if getattr(self, f"{name}_min") > getattr(self, f"{name}_max"):
                raise ValueError(f"@{name}_max@ {name}_max must not be below {name}_min")
        return self


class IntervalBounds(_Strict):
    """Bounds of the set_heartbeat_interval command, in seconds (inclusive)."""

    min: float = Field(default=5.0, ge=1.0, le=86_400, description="Shortest heartbeat interval a command may set.")
    max: float = Field(default=3600.0, ge=1.0, le=86_400, description="Longest heartbeat interval a command may set.")

    @model_validator(mode="after")
    def _ordered(self) -> IntervalBounds:
        if self.min > self.max:
            raise ValueError("@max@ max must not be below min")
        return self


class CommandsConfig(_Strict):
    """MQTT commands (docs/mqtt.md): who may send them, which ones run, and within which bounds."""

    trusted_keys: tuple[Path, ...] = Field(
        default=(),
        description="Ed25519 public keys (PEM) of operators: commands must be signed by one of them, name this "
        "device and be unexpired. Empty: commands are unauthenticated (the agent warns once at start).",
    )
    allow: tuple[str, ...] = Field(
        default=tuple(sorted(KNOWN_COMMANDS)),
        description="Commands this agent runs; others are refused with command_not_allowed.",
    )
    max_ttl_s: float = Field(
        default=3600.0, gt=0.0, le=7 * 86_400,
        description="A signed command valid for longer than this (exp - ts) is refused.",
    )
    set_thresholds: ThresholdBounds = Field(default=ThresholdBounds(), description="Bounds of set_thresholds.")
    heartbeat_interval: IntervalBounds = Field(
        default=IntervalBounds(), description="Bounds of set_heartbeat_interval."
    )

    @field_validator("allow")
    @classmethod
    def _known(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        unknown = sorted(set(v) - KNOWN_COMMANDS)
        if unknown:
            raise ValueError(f"unknown commands {unknown} (known: {sorted(KNOWN_COMMANDS)})")
        return v

    def policy(self) -> CommandPolicy:
        t = self.set_thresholds
        return CommandPolicy(
            allow=frozenset(self.allow),
            bounds={
                "set_thresholds": {
                    "score": (t.score_min, t.score_max),
                    "iou": (t.iou_min, t.iou_max),
                    "anomaly": (t.anomaly_min, t.anomaly_max),
                },
                "set_heartbeat_interval": {"seconds": (self.heartbeat_interval.min, self.heartbeat_interval.max)},
            },
        )


class MetricsConfig(_Strict):
    enabled: bool = Field(default=True, description="Serve Prometheus metrics.")
    bind: str = Field(default="127.0.0.1", min_length=1, description="Address of the metrics endpoint.")
    port: Port = Field(default=9108, description="Port of the metrics endpoint (0 is not allowed).")

    @field_validator("bind")
    @classmethod
    def _bind_is_an_address(cls, v: str) -> str:
        return _listen_address(v)


class UpdatesConfig(_Strict):
    """Signed over-the-air model updates (docs/model-updates.md). Off unless enabled with trusted keys."""

    enabled: bool = Field(default=False, description="Watch the drop folder and accept model_update commands.")
    trusted_keys: tuple[Path, ...] = Field(
        default=(), description="Ed25519 public keys (PEM files) whose signatures are accepted."
    )
    drop_dir: Path | None = Field(
        default=None, description="Folder polled for update files; default <state_dir>/updates. Processed files "
        "go to done/, refused ones to rejected/ with a <name>.reason.json."
    )
    watch: bool = Field(
        default=True, description="Install files appearing in drop_dir; off: only on a model_update command."
    )
    poll_interval_s: float = Field(default=2.0, gt=0.0, le=3600, description="Seconds between drop_dir scans.")
    max_update_bytes: ByteSize = Field(
        default=512 * 1024 * 1024, description="Largest update file, and the most bytes it may unpack to."
    )
    probation_inputs: int = Field(
        default=20, ge=1, le=100_000,
        description="After a swap, the first N inputs of the new model are watched (errors are retried on the "
        "previous model); too many errors roll it back.",
    )
    max_error_rate: float = Field(
        default=0.1, ge=0.0, lt=1.0,
        description="Errors allowed among the probation inputs, as a fraction; one more rolls back.",
    )
    fetch_base_url: str | None = Field(
        default=None, pattern=r"^https?://[^\s/?#@]+(/[^\s?#]*)?$",
        description="The coordinator's update files (http://host:port/ or a path below it): a model_update command "
        "whose url is a relative name is fetched from here. Absolute URLs in signed commands need no base.",
    )
    fetch_timeout_s: float = Field(
        default=30.0, gt=0.0, le=3600, description="Socket timeout of one fetch request (connect, each read)."
    )

    @model_validator(mode="after")
    def _keys_when_enabled(self) -> UpdatesConfig:
        if self.enabled and not self.trusted_keys:
            raise ValueError("@trusted_keys@ updates.enabled needs at least one trusted key")
        return self


class HomeAssistantConfig(_Strict):
    """Home Assistant MQTT discovery (docs/mqtt.md#home-assistant): retained entity configs and per-pipeline state."""

    enabled: bool = Field(default=False, description="Publish Home Assistant discovery configs and pipeline state.")
    discovery_prefix: str = Field(
        default="homeassistant", min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_-]+(/[A-Za-z0-9_-]+)*$",
        description="Home Assistant's discovery prefix (its MQTT integration setting).",
    )
    state_interval_s: float = Field(
        default=1.0, ge=0.1, le=3600, description="Seconds between state updates of one pipeline at most.",
    )


class AgentConfig(_Strict):
    device_id: Name = Field(
        default="edge-01", description="This device's id: MQTT topics, result ids ('coordinator' is reserved)."
    )
    state_dir: Path = Field(default=Path("var/edge-agent"), description="Outbox, spool and other state.")
    models_dir: Path | None = Field(default=None, description="Folder of model bundles; default: the bundled models/.")
    log_level: Literal["debug", "info", "warning", "error"] = Field(default="info", description="Log level.")
    shutdown_timeout_s: float = Field(
        default=10.0, gt=0.0, le=600, description="Bound on graceful shutdown (SIGTERM) in seconds."
    )
    models: tuple[ModelConfig, ...] = Field(min_length=1, description="Model bundles loaded at start.")
    pipelines: tuple[PipelineConfig, ...] = Field(min_length=1, description="Named pipelines.")
    sources: tuple[Source, ...] = Field(default=(), description="Watched folders and cameras.")
    mqtt: MqttConfig = Field(default=MqttConfig(), description="Broker connection and publishing.")
    outbox: OutboxConfig = Field(default=OutboxConfig(), description="Durable result store limits.")
    http: HttpConfig = Field(default=HttpConfig(), description="HTTP API (uploads, status, farmer page).")
    metrics: MetricsConfig = Field(default=MetricsConfig(), description="Prometheus endpoint.")
    updates: UpdatesConfig = Field(default=UpdatesConfig(), description="Signed model updates with rollback.")
    commands: CommandsConfig = Field(default=CommandsConfig(), description="MQTT commands: keys, allow-list, bounds.")
    home_assistant: HomeAssistantConfig = Field(
        default=HomeAssistantConfig(), description="Home Assistant MQTT discovery.",
    )
    line: LineConfig = Field(default=LineConfig(), description="Line triggers, product recipes, reject outputs.")
    decode_pixel_budget: int = Field(
        default=24_000_000, ge=1_000_000, le=1_000_000_000,
        description="Pixels that may be decoded at once, summed over every image being decoded (uploads and "
        "folder files, all pipelines): a decode that would go over waits its turn, so concurrent large images "
        "queue instead of exhausting memory (about 4 bytes per pixel). An image larger than the whole budget "
        "is decoded alone.",
    )

    @field_validator("device_id")
    @classmethod
    def _not_reserved(cls, v: str) -> str:
        if v == "coordinator":
            raise ValueError("'coordinator' is reserved (edge/v1/coordinator/status is the coordinator's topic)")
        return v

    @model_validator(mode="after")
    def _references(self) -> AgentConfig:
        problems = reference_problems(self)
        if problems:
            key, msg = problems[0]
            raise ValueError(f"@{key}@ {msg}")
        return self


def reference_problems(cfg: AgentConfig) -> list[tuple[str, str]]:
    """Duplicate names and dangling references, as (key path, message)."""
    problems: list[tuple[str, str]] = []
    for section, items in (("models", cfg.models), ("pipelines", cfg.pipelines), ("sources", cfg.sources)):
        seen: set[str] = set()
        for i, item in enumerate(items):
            if item.name in seen:
                problems.append((f"{section}.{i}.name", f"duplicate name {item.name!r}"))
            seen.add(item.name)
    models = {m.name for m in cfg.models}
    pipelines = {p.name for p in cfg.pipelines}
    for i, p in enumerate(cfg.pipelines):
        if p.model not in models:
            problems.append((f"pipelines.{i}.model", f"unknown model {p.model!r} (known: {sorted(models)})"))
    for i, s in enumerate(cfg.sources):
        if s.pipeline not in pipelines:
            problems.append((f"sources.{i}.pipeline", f"unknown pipeline {s.pipeline!r} (known: {sorted(pipelines)})"))
    problems.extend(_line_problems(cfg))
    if cfg.http.pipeline is not None and cfg.http.pipeline not in pipelines:
        problems.append(("http.pipeline", f"unknown pipeline {cfg.http.pipeline!r}"))
    if cfg.http.enabled and cfg.metrics.enabled and cfg.http.port == cfg.metrics.port:
        problems.append(("metrics.port", f"{cfg.metrics.port} is also http.port"))
    return problems


def _line_problems(cfg: AgentConfig) -> list[tuple[str, str]]:
    """Recipes, chains, outputs and presence triggers that name things that do not exist (or do not fit)."""
    problems: list[tuple[str, str]] = []
    models = {m.name for m in cfg.models}
    kinds = {p.name: p.kind for p in cfg.pipelines}
    cameras = {s.name for s in cfg.sources if isinstance(s, CameraSourceConfig)}
    line = cfg.line
    for i, p in enumerate(cfg.pipelines):
        if p.inspection is not None and p.inspection.classify is not None and p.inspection.classify.model not in models:
            problems.append((f"pipelines.{i}.inspection.classify.model",
                             f"unknown model {p.inspection.classify.model!r} (known: {sorted(models)})"))
    outputs: set[str] = set()
    for i, o in enumerate(line.outputs):
        if o.name in outputs:
            problems.append((f"line.outputs.{i}.name", f"duplicate name {o.name!r}"))
        outputs.add(o.name)
        if isinstance(o, MqttOutputConfig) and not cfg.mqtt.enabled:
            problems.append((f"line.outputs.{i}.type", "an mqtt output needs mqtt.enabled"))
    recipes: set[str] = set()
    for i, r in enumerate(line.recipes):
        key = f"line.recipes.{i}"
        if r.id in recipes:
            problems.append((f"{key}.id", f"duplicate recipe {r.id!r}"))
        recipes.add(r.id)
        if r.pipeline not in kinds:
            problems.append((f"{key}.pipeline", f"unknown pipeline {r.pipeline!r} (known: {sorted(kinds)})"))
        elif kinds[r.pipeline] != "inspection":
            problems.append((f"{key}.pipeline", f"pipeline {r.pipeline!r} is kind {kinds[r.pipeline]}, not inspection"))
        if r.camera is not None and r.camera not in cameras:
            problems.append((f"{key}.camera", f"unknown camera source {r.camera!r} (known: {sorted(cameras)})"))
        if r.classify is not None and r.classify.model not in models:
            problems.append((f"{key}.classify.model", f"unknown model {r.classify.model!r} (known: {sorted(models)})"))
        for j, name in enumerate(r.outputs or ()):
            if name not in outputs:
                problems.append((f"{key}.outputs.{j}", f"unknown output {name!r} (known: {sorted(outputs)})"))
    for i, t in enumerate(line.presence):
        if t.camera not in cameras:
            problems.append((f"line.presence.{i}.camera",
                             f"unknown camera source {t.camera!r} (known: {sorted(cameras)})"))
        if t.recipe not in recipes:
            problems.append((f"line.presence.{i}.recipe", f"unknown recipe {t.recipe!r} (known: {sorted(recipes)})"))
    if line.default_recipe is not None and line.default_recipe not in recipes:
        problems.append(("line.default_recipe", f"unknown recipe {line.default_recipe!r} (known: {sorted(recipes)})"))
    if line.recipes and not line.outputs:
        problems.append(("line.outputs", "recipes need at least one output to signal to"))
    return problems


# --- loading -------------------------------------------------------------------------------------------------------

_SECRET_KEYS = ("password",)


def _reject_inline_secrets(doc: Mapping[str, Any]) -> tuple[str, str] | None:
    mqtt = doc.get("mqtt")
    if isinstance(mqtt, Mapping) and "password" in mqtt:
        return ("mqtt.password", "inline passwords are not allowed; use password_file or password_env")
    sources = doc.get("sources")
    if isinstance(sources, list):
        for i, s in enumerate(sources):
            if isinstance(s, Mapping) and "password" in s:
                return (f"sources.{i}.password", "inline passwords are not allowed; use password_file or password_env")
    return None


def _format_validation(source: str, exc: ValidationError) -> str:
    err = exc.errors(include_url=False)[0]
    msg = str(err["msg"]).removeprefix("Value error, ")
    parts = [str(p) for p in err["loc"]]
    if len(parts) > 2 and parts[0] == "sources" and parts[2] in ("folder", "camera"):
        del parts[2]  # the discriminator tag pydantic inserts
    if len(parts) > 3 and parts[:2] == ["line", "outputs"] and parts[3] in ("modbus", "webhook", "gpio", "mqtt"):
        del parts[3]
    loc = ".".join(parts)
    match = re.match(r"^@([^@]+)@ (.*)$", msg)
    if match:
        loc, msg = (f"{loc}.{match.group(1)}" if loc else match.group(1)), match.group(2)
    if err["type"] == "extra_forbidden":
        msg = "unknown key"
    return f"{source}: {loc or '(root)'}: {msg}"


def _duplicate_key(root: yaml.Node) -> tuple[str, int, int] | None:
    """(key path, first line, second line) of the first mapping key that appears twice, if any."""
    todo: deque[tuple[yaml.Node, tuple[str, ...]]] = deque([(root, ())])
    seen: set[int] = set()
    while todo:
        node, path = todo.popleft()
        if id(node) in seen:  # an alias of a node already walked
            continue
        seen.add(id(node))
        if isinstance(node, yaml.MappingNode):
            lines: dict[str, int] = {}
            for key, value in node.value:
                if isinstance(key, yaml.ScalarNode) and key.tag != "tag:yaml.org,2002:merge":
                    line = key.start_mark.line + 1
                    if key.value in lines:
                        return ".".join((*path, key.value)), lines[key.value], line
                    lines[key.value] = line
                    todo.append((value, (*path, key.value)))
                else:
                    todo.append((value, path))
        elif isinstance(node, yaml.SequenceNode):
            todo.extend((value, (*path, str(i))) for i, value in enumerate(node.value))
    return None


def load_yaml(text: str, source: str) -> Any:
    """``yaml.safe_load`` that refuses a mapping key given twice (PyYAML keeps the last one silently).

    Raises ConfigError naming the key path and both lines, or yaml.YAMLError for malformed YAML."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        duplicate = _duplicate_key(node)
        if duplicate is not None:
            key, first, second = duplicate
            raise ConfigError(f"{source}: {key}: duplicate key (lines {first} and {second})")
        return loader.construct_document(node)
    finally:
        loader.dispose()


def parse_config(text: str, source: str = "config.yaml") -> AgentConfig:
    """Parse and validate YAML text (pure: no file access, no secrets resolved)."""
    try:
        doc = load_yaml(text, source)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        where = f"line {mark.line + 1}" if mark is not None else "(unknown line)"
        problem = exc.problem or str(exc)
        if isinstance(exc, yaml.constructor.ConstructorError):
            problem = f"unsupported YAML tag ({problem})"
        raise ConfigError(f"{source}: {where}: {problem}".replace("\n", " ")) from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: (root): YAML error: {exc}".replace("\n", " ")) from exc
    if doc is None:
        doc = {}
    if not isinstance(doc, dict):
        raise ConfigError(f"{source}: (root): top level must be a mapping")
    inline = _reject_inline_secrets(doc)
    if inline is not None:
        raise ConfigError(f"{source}: {inline[0]}: {inline[1]}")
    try:
        return AgentConfig.model_validate(doc)
    except ValidationError as exc:
        raise ConfigError(_format_validation(source, exc).replace("\n", " ")) from exc


def _read_secret(
    source: str, key: str, file: Path | None, env: str | None, environ: Mapping[str, str]
) -> SecretStr | None:
    if file is not None:
        try:
            value = file.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ConfigError(f"{source}: {key}_file: cannot read {file}: {exc.strerror}") from exc
        return SecretStr(value)
    if env is not None:
        if env not in environ:
            raise ConfigError(f"{source}: {key}_env: environment variable {env!r} is not set")
        return SecretStr(environ[env])
    return None


def _nearest_existing(path: Path) -> Path:
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    return probe


def _writable_dir_problem(path: Path) -> str | None:
    if path.exists() and not path.is_dir():
        return f"{path} is not a directory"
    probe = _nearest_existing(path)
    if not probe.is_dir():
        return f"{path} cannot be created: {probe} is not a directory"
    if not os.access(probe, os.W_OK | os.X_OK):
        return f"{probe} is not writable"
    try:
        if os.statvfs(probe).f_flag & os.ST_RDONLY:
            return f"{probe} is on a read-only file system"
    except OSError as exc:
        return f"{probe}: {exc.strerror}"
    return None


def _resolve(base: Path, p: Path) -> Path:
    return p if p.is_absolute() else base / p


def finalize(cfg: AgentConfig, source: str, base: Path, environ: Mapping[str, str]) -> AgentConfig:
    """Resolve relative paths against ``base``, check files and directories, read secrets."""
    state_dir = _resolve(base, cfg.state_dir)
    problem = _writable_dir_problem(state_dir)
    if problem:
        raise ConfigError(f"{source}: state_dir: {problem}")
    models_dir = _resolve(base, cfg.models_dir) if cfg.models_dir is not None else None
    if models_dir is not None and not models_dir.is_dir():
        raise ConfigError(f"{source}: models_dir: {models_dir} is not a directory")

    tls = cfg.mqtt.tls
    tls_updates: dict[str, Any] = {}
    for key in ("ca_file", "cert_file", "key_file"):
        value: Path | None = getattr(tls, key)
        if value is None:
            continue
        resolved = _resolve(base, value)
        if cfg.mqtt.enabled and tls.enabled and not resolved.is_file():
            raise ConfigError(f"{source}: mqtt.tls.{key}: file not found: {resolved}")
        tls_updates[key] = resolved
    if cfg.mqtt.enabled and tls.enabled and (tls.cert_file is None) != (tls.key_file is None):
        raise ConfigError(f"{source}: mqtt.tls.key_file: cert_file and key_file go together")

    mqtt_pw_file = _resolve(base, cfg.mqtt.password_file) if cfg.mqtt.password_file else None
    mqtt_password = _read_secret(source, "mqtt.password", mqtt_pw_file, cfg.mqtt.password_env, environ)
    ack_keys = _key_files(source, "mqtt.ack_keys", base, cfg.mqtt.ack_keys, cfg.mqtt.enabled)
    result_key = None
    if cfg.mqtt.result_key is not None:
        (result_key,) = _key_files(source, "mqtt.result_key", base, (cfg.mqtt.result_key,), cfg.mqtt.enabled)
    mqtt = cfg.mqtt.model_copy(
        update={"tls": tls.model_copy(update=tls_updates), "password": mqtt_password, "password_file": mqtt_pw_file,
                "ack_keys": ack_keys, "result_key": result_key}
    )
    command_keys = _key_files(source, "commands.trusted_keys", base, cfg.commands.trusted_keys, cfg.mqtt.enabled)
    commands = cfg.commands.model_copy(update={"trusted_keys": command_keys})

    sources: list[FolderSourceConfig | CameraSourceConfig] = []
    for i, src in enumerate(cfg.sources):
        if isinstance(src, FolderSourceConfig):
            path = _resolve(base, src.path)
            folders = {
                "path": path,
                "done_dir": _resolve(base, src.done_dir) if src.done_dir else path / "done",
                "rejected_dir": _resolve(base, src.rejected_dir) if src.rejected_dir else path / "rejected",
            }
            for key, folder in folders.items():
                problem = _writable_dir_problem(folder)
                if problem:
                    raise ConfigError(f"{source}: sources.{i}.{key}: {problem}")
            sources.append(src.model_copy(update=folders))
        else:
            pw_file = _resolve(base, src.password_file) if src.password_file else None
            pw = _read_secret(source, f"sources.{i}.password", pw_file, src.password_env, environ)
            sources.append(src.model_copy(update={"password": pw, "password_file": pw_file}))

    http = cfg.http
    if http.tokens_file is not None:
        tokens = _resolve(base, http.tokens_file)
        if http.enabled and not tokens.is_file():
            raise ConfigError(f"{source}: http.tokens_file: file not found: {tokens}")
        http = http.model_copy(update={"tokens_file": tokens})

    upd = cfg.updates
    keys = tuple(_resolve(base, k) for k in upd.trusted_keys)
    for i, key_path in enumerate(keys):
        if upd.enabled and not key_path.is_file():
            raise ConfigError(f"{source}: updates.trusted_keys.{i}: file not found: {key_path}")
    drop_dir = _resolve(base, upd.drop_dir) if upd.drop_dir is not None else state_dir / "updates"
    updates = upd.model_copy(update={"trusted_keys": keys, "drop_dir": drop_dir})

    return cfg.model_copy(
        update={
            "state_dir": state_dir,
            "models_dir": models_dir,
            "mqtt": mqtt,
            "sources": tuple(sources),
            "http": http,
            "updates": updates,
            "commands": commands,
        }
    )


def _key_files(source: str, key: str, base: Path, paths: tuple[Path, ...], used: bool) -> tuple[Path, ...]:
    """Resolve key file paths against ``base``; each must exist when it is ``used``."""
    resolved = tuple(_resolve(base, p) for p in paths)
    for i, path in enumerate(resolved):
        if used and not path.is_file():
            where = key if key.endswith("result_key") else f"{key}.{i}"
            raise ConfigError(f"{source}: {where}: file not found: {path}")
    return resolved


def load_config(path: str | Path, environ: Mapping[str, str] | None = None) -> AgentConfig:
    """Read, parse, validate and finalize a config file; relative paths are relative to the file."""
    path = Path(path)
    source = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise ConfigError(f"{source}: (file): not found") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{source}: (file): cannot read: {exc}") from exc
    cfg = parse_config(text, source)
    return finalize(cfg, source, path.resolve().parent, os.environ if environ is None else environ)


DEFAULT_CONFIG_YAML = """\
# Embedded default: a bundled model, a watched folder, SQLite outbox, MQTT on localhost.
device_id: edge-01
state_dir: var/edge-agent
models:
  - name: default
    bundle: {bundle}
pipelines:
  - name: {kind}
    kind: {kind}
    model: default
sources:
  - type: folder
    name: inbox
    pipeline: {kind}
    path: var/edge-agent/inbox
    poll_interval_s: 0.5
mqtt:
  host: localhost
  port: 1883
metrics:
  enabled: false
"""


def default_config(
    cwd: Path | None = None,
    environ: Mapping[str, str] | None = None,
    bundle: str = "crop_disease",
    kind: Literal["crop", "inspection", "livestock", "plain"] = "crop",
) -> AgentConfig:
    """The embedded default (``edge-agent run`` with no ``--config``); state under ``<cwd>/var/edge-agent``."""
    if not re.match(_NAME, bundle):
        raise ConfigError(f"(default config): models.0.bundle: invalid bundle name {bundle!r}")
    cfg = parse_config(DEFAULT_CONFIG_YAML.format(bundle=bundle, kind=kind), "(default config)")
    return finalize(cfg, "(default config)", cwd or Path.cwd(), os.environ if environ is None else environ)
