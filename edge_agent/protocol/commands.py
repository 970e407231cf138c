"""Validation of MQTT commands (``edge/v1/<device>/cmd/<name>``). Pure: no I/O.

A command payload is ``{"v": 1, "id": "<unique id>", "args": {...}}`` (``v`` optional), plus, when an operator
signed it (``signing.py``), ``device`` and ``name`` (which must match the topic), ``ts``, ``exp`` and ``sig``. Commands:
``ping``, ``heartbeat``, ``republish``, ``set_heartbeat_interval {seconds}``, ``set_thresholds {pipeline, score?,
iou?, anomaly?}``, ``model_update {file, url?, sha256?, size?}`` (a file name in the update drop folder; with
``url``, ``sha256`` and ``size``, the agent first fetches it over HTTP from the coordinator under that name) and
``model_rollback {model}`` (see docs/model-updates.md), ``feedback {result, kind, operator?, note?}`` (an
operator's word on an inspected part: ``false_reject`` or ``missed_defect``; docs/agent.md) and ``trigger {recipe?,
part_id?}`` (inspect the part now in front of the recipe's camera for the line; docs/agent.md#the-line). Anything
malformed is refused as a whole (no partial change) with a stable code:

=========================  ==========================================================
code                       when
=========================  ==========================================================
``command_empty``          empty payload
``command_too_large``      more than ``MAX_COMMAND_BYTES``
``command_not_json``       invalid UTF-8, not JSON, NaN/Infinity, not an object
``command_unknown``        no such command name
``command_invalid``        missing/odd id, unknown or wrongly typed args, out of range
``command_replayed``       the id already ran (checked by the caller against its journal)
``command_wrong_target``   ``device`` or ``name`` in the payload differ from the topic
``command_not_allowed``    not in the agent's allow-list (``commands.allow``)
``command_out_of_bounds``  an argument outside the agent's configured bounds (:class:`CommandPolicy`)
``command_<auth reason>``  refused by the signature check: ``command_unsigned``, ``command_untrusted_key``,
                           ``command_bad_signature``, ``command_expired``, ``command_from_future``,
                           ``command_too_long``; and ``command_retained`` (a retained command never runs)
=========================  ==========================================================
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson

from edge_agent.errors import EdgeAgentError

MAX_COMMAND_BYTES = 64 * 1024
ID_RE = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")
NAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
FILE_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
# an absolute http(s) URL (no credentials, no fragment), or a relative path resolved against updates.fetch_base_url
URL_RE = re.compile(r"^(https?://[A-Za-z0-9.:\[\]_-]+(/[A-Za-z0-9_.~%/-]*)?(\?[A-Za-z0-9_.~%=&-]*)?|"
                    r"[A-Za-z0-9_][A-Za-z0-9_.~%/-]{0,255})$")
RESULT_RE = re.compile(r"^[A-Za-z0-9_.:-]{1,128}$")
FEEDBACK_KINDS = ("false_reject", "missed_defect")
MAX_URL = 1024
MAX_FETCH_BYTES = 1 << 40


class CommandError(EdgeAgentError):
    """A refused command; ``code`` is one of the codes in the module docstring."""

    code = "command_invalid"

    def __init__(self, message: str, code: str = "command_invalid", command_id: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.command_id = command_id


@dataclass(frozen=True)
class Command:
    id: str
    name: str
    args: dict[str, Any] = field(default_factory=dict)
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)
    """The decoded payload as sent (for the signature check)."""


def _number(lo: float, hi: float) -> Callable[[str, Any], float]:
    def check(key: str, value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise CommandError(f"argument {key!r} must be a number", "command_invalid")
        number = float(value)
        if not math.isfinite(number) or not lo <= number <= hi:
            raise CommandError(f"argument {key!r} must be within [{lo}, {hi}]", "command_invalid")
        return number

    return check


def _name(key: str, value: Any) -> str:
    if not isinstance(value, str) or not NAME_RE.match(value):
        raise CommandError(f"argument {key!r} must be a name matching [A-Za-z0-9_.-]{{1,64}}", "command_invalid")
    return value


def _file_name(key: str, value: Any) -> str:
    """A plain file name (no folder part): the file must already sit in the agent's update drop folder."""
    if not isinstance(value, str) or not FILE_RE.match(value):
        raise CommandError(
            f"argument {key!r} must be a file name in the drop folder matching [A-Za-z0-9_][A-Za-z0-9_.-]{{0,127}}",
            "command_invalid",
        )
    return value


def _url(key: str, value: Any) -> str:
    """Where the agent fetches the update file: ``http(s)://host[:port]/path`` or a relative path (no ``..``)."""
    if (not isinstance(value, str) or len(value) > MAX_URL or not URL_RE.match(value)
            or ".." in value.split("?", 1)[0].split("/")):
        raise CommandError(f"argument {key!r} must be an http(s) URL or a relative path without '..'",
                           "command_invalid")
    return value


def _sha256(key: str, value: Any) -> str:
    if not isinstance(value, str) or not SHA256_RE.match(value):
        raise CommandError(f"argument {key!r} must be 64 lowercase hex digits (sha256)", "command_invalid")
    return value


def _size(key: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_FETCH_BYTES:
        raise CommandError(f"argument {key!r} must be an integer byte count within [1, 2^40]", "command_invalid")
    return value


def _result_ref(key: str, value: Any) -> str:
    """A result id, input id or part id."""
    if not isinstance(value, str) or not RESULT_RE.match(value):
        raise CommandError(f"argument {key!r} must be a result, input or part id matching [A-Za-z0-9_.:-]{{1,128}}",
                           "command_invalid")
    return value


def _feedback_kind(key: str, value: Any) -> str:
    if value not in FEEDBACK_KINDS:
        raise CommandError(f"argument {key!r} must be one of {', '.join(FEEDBACK_KINDS)}", "command_invalid")
    return str(value)


def _text(limit: int) -> Callable[[str, Any], str]:
    def check(key: str, value: Any) -> str:
        if not isinstance(value, str) or len(value) > limit or not value.isprintable():
            raise CommandError(f"argument {key!r} must be printable text of at most {limit} characters",
                               "command_invalid")
        return value

    return check


# name -> (required args, optional args); each arg maps to its checker
_SPECS: dict[str, tuple[dict[str, Callable[[str, Any], Any]], dict[str, Callable[[str, Any], Any]]]] = {
    "ping": ({}, {}),
    "heartbeat": ({}, {}),
    "republish": ({}, {}),
    "set_heartbeat_interval": ({"seconds": _number(1.0, 86400.0)}, {}),
    "set_thresholds": (
        {"pipeline": _name},
        {"score": _number(0.0, 1.0), "iou": _number(0.0, 1.0), "anomaly": _number(0.0, 1e9)},
    ),
    "model_update": ({"file": _file_name}, {"url": _url, "sha256": _sha256, "size": _size}),
    "model_rollback": ({"model": _name}, {}),
    "feedback": ({"result": _result_ref, "kind": _feedback_kind}, {"operator": _text(64), "note": _text(500)}),
    "trigger": ({}, {"recipe": _name, "part_id": _name}),
}
KNOWN_COMMANDS = frozenset(_SPECS)
_FIELDS = frozenset({"v", "id", "args", "device", "name", "ts", "exp", "sig"})


def parse_command(name: str, payload: bytes) -> Command:
    """Validate one command; returns a Command or raises CommandError (nothing is half-applied)."""
    if not payload:
        raise CommandError("empty command payload", "command_empty")
    if len(payload) > MAX_COMMAND_BYTES:
        raise CommandError(f"command of {len(payload)} bytes exceeds {MAX_COMMAND_BYTES}", "command_too_large")
    try:
        value = orjson.loads(payload)
    except orjson.JSONDecodeError as exc:
        raise CommandError(f"command is not valid UTF-8 JSON: {exc}", "command_not_json") from exc
    if not isinstance(value, dict):
        raise CommandError("command payload must be a JSON object", "command_not_json")
    command_id = value.get("id")
    if not isinstance(command_id, str) or not ID_RE.match(command_id):
        raise CommandError("command 'id' must be a string matching [A-Za-z0-9_.:-]{1,64}", "command_invalid")
    extra = set(value) - _FIELDS
    if extra or value.get("v", 1) != 1:
        raise CommandError(f"unexpected command fields or version: {sorted(extra)}", "command_invalid", command_id)
    if "name" in value and value["name"] != name:
        raise CommandError(f"command name {str(value['name'])[:64]!r} does not match the topic's {name[:64]!r}",
                           "command_wrong_target", command_id)
    if name not in _SPECS:
        raise CommandError(f"unknown command {name[:64]!r}", "command_unknown", command_id)
    args = value.get("args", {})
    if not isinstance(args, dict):
        raise CommandError("command 'args' must be an object", "command_invalid", command_id)
    required, optional = _SPECS[name]
    unknown = set(args) - set(required) - set(optional)
    if unknown:
        raise CommandError(f"unknown arguments {sorted(unknown)} for {name}", "command_invalid", command_id)
    missing = set(required) - set(args)
    if missing:
        raise CommandError(f"missing arguments {sorted(missing)} for {name}", "command_invalid", command_id)
    checked: dict[str, Any] = {}
    try:
        for key, check in {**required, **optional}.items():
            if key in args:
                checked[key] = check(key, args[key])
    except CommandError as exc:
        raise CommandError(exc.message, exc.code, command_id) from None
    if name == "set_thresholds" and len(checked) == 1:
        raise CommandError("set_thresholds needs at least one of score, iou, anomaly", "command_invalid", command_id)
    fetch = {"url", "sha256", "size"} & set(checked)
    if name == "model_update" and fetch and len(fetch) != 3:
        raise CommandError("model_update: url, sha256 and size go together", "command_invalid", command_id)
    return Command(id=command_id, name=name, args=checked, raw=value)


@dataclass(frozen=True)
class CommandPolicy:
    """What this agent lets commands do, beyond the built-in ranges: an allow-list and, per command and argument,
    inclusive numeric bounds (``{"set_thresholds": {"score": (0.05, 0.95)}}``). The default allows everything."""

    allow: frozenset[str] = KNOWN_COMMANDS
    bounds: Mapping[str, Mapping[str, tuple[float, float]]] = field(default_factory=dict)


def check_policy(command: Command, policy: CommandPolicy) -> None:
    """Raise CommandError ``command_not_allowed`` or ``command_out_of_bounds``; nothing is applied either way."""
    if command.name not in policy.allow:
        raise CommandError(
            f"command {command.name} is not allowed on this agent (commands.allow)", "command_not_allowed", command.id
        )
    for arg, (lo, hi) in policy.bounds.get(command.name, {}).items():
        value = command.args.get(arg)
        if isinstance(value, float) and not lo <= value <= hi:
            raise CommandError(
                f"argument {arg!r} = {value:g} is outside this agent's bounds [{lo:g}, {hi:g}]",
                "command_out_of_bounds",
                command.id,
            )
