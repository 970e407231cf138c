"""Commands that change the running agent (the publisher checks, authenticates and answers them; it handles its
own, such as ``ping`` and ``republish``, before these)."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from edge_agent.delivery.feedback import InspectionStore
from edge_agent.errors import EdgeAgentError, UpdateError
from edge_agent.flow.pipeline import Pipeline
from edge_agent.line.controller import LineController
from edge_agent.protocol.commands import Command, CommandError
from edge_agent.updates.fetch import FetchSpec
from edge_agent.updates.manager import ModelUpdater

log = logging.getLogger(__name__)


def handle_command(command: Command, pipelines: Mapping[str, Pipeline], updater: ModelUpdater | None,
                   inspections: InspectionStore | None = None, line: LineController | None = None) -> dict[str, Any]:
    """Apply ``command``; ``updater`` is None where model updates are disabled, ``inspections`` where no pipeline
    keeps images for feedback, ``line`` where no recipe is configured. Raises CommandError with a code."""
    if command.name == "trigger":
        if line is None:
            raise CommandError("no line recipes are configured on this agent (line.recipes)", "command_unsupported",
                               command.id)
        recipe = command.args.get("recipe")
        part_id = str(command.args.get("part_id") or command.id)
        try:
            line.trigger(str(recipe) if recipe is not None else None, part_id, source="mqtt")
        except EdgeAgentError as exc:
            raise CommandError(exc.message, exc.code, command.id) from exc
        return {"accepted": True, "recipe": recipe or line.cfg.default_recipe, "part_id": part_id,
                "outcome": "signalled on the recipe's outputs by its deadline"}
    if command.name == "feedback":
        if inspections is None:
            raise CommandError("no inspection pipeline keeps images for feedback (inspection.keep_images)",
                               "command_unsupported", command.id)
        args = command.args
        try:
            stored = inspections.add_feedback(str(args["result"]), str(args["kind"]), operator=args.get("operator"),
                                               note=args.get("note"), via="mqtt")
        except EdgeAgentError as exc:  # feedback_* codes, storage_full
            raise CommandError(exc.message, exc.code, command.id) from exc
        fb = stored["feedback"]
        answer: dict[str, Any] = {"stored": stored["stored"], "duplicate": stored["duplicate"],
                                  "result_id": fb["result_id"], "pipeline": fb["pipeline"], "kind": fb["kind"],
                                  "image": fb["image"]}
        if "replaced" in stored:
            answer["replaced"] = stored["replaced"]
        return answer
    if command.name == "set_thresholds":
        args = dict(command.args)
        name = str(args.pop("pipeline"))
        pipeline = pipelines.get(name)
        if pipeline is None:
            raise CommandError(f"unknown pipeline {name!r}", "command_invalid", command.id)
        try:
            applied = pipeline.set_thresholds(**{k: float(v) for k, v in args.items()})
        except ValueError as exc:
            raise CommandError(str(exc), "command_invalid", command.id) from exc
        log.info("thresholds of pipeline %s set to %s", name, applied)
        return {"pipeline": name, "thresholds": applied}
    if command.name in ("model_update", "model_rollback"):
        if updater is None:
            raise CommandError("model updates are disabled on this agent (updates.enabled)",
                               "command_unsupported", command.id)
        try:
            if command.name == "model_update":
                outcome = "reported as a model_updated or model_update_rejected event"
                if "url" in command.args:
                    spec = FetchSpec(name=str(command.args["file"]), url=str(command.args["url"]),
                                     sha256=str(command.args["sha256"]), size=int(command.args["size"]))
                    updater.request_fetch(spec)
                    return {"accepted": True, "file": spec.name, "fetching": spec.url, "outcome": outcome}
                path = updater.request_file(str(command.args["file"]))
                return {"accepted": True, "file": path.name, "outcome": outcome}
            updater.request_rollback(str(command.args["model"]))
            return {"accepted": True, "model": command.args["model"],
                    "outcome": "reported as a model_rolled_back event"}
        except UpdateError as exc:
            raise CommandError(exc.message, exc.code, command.id) from exc
    raise CommandError(f"command {command.name} is not supported here", "command_unsupported", command.id)
