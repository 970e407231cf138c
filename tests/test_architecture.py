"""The folders are the architecture: every module of edge_agent sits in exactly one layer of the import-linter
contract in pyproject.toml, so `lint-imports` checks each one's imports (a new module is covered or this fails)."""

from __future__ import annotations

import sys
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent


def _modules() -> list[str]:
    mods = []
    for path in sorted((ROOT / "edge_agent").rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        if parts[-1] in {"__init__", "__main__"}:
            continue  # package docstrings and `python -m` shims hold no imports worth a layer
        mods.append(".".join(parts))
    return mods


def _layers() -> list[list[str]]:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    contracts = config["tool"]["importlinter"]["contracts"]
    (layered,) = [c for c in contracts if c["type"] == "layers"]
    return [[name.strip() for name in layer.replace(":", "|").split("|")] for layer in layered["layers"]]


def _covering(module: str, layers: list[list[str]]) -> list[str]:
    return [name for layer in layers for name in layer if module == name or module.startswith(name + ".")]


def test_every_module_is_in_exactly_one_layer() -> None:
    layers = _layers()
    modules = _modules()
    assert len(modules) > 40
    uncovered = [m for m in modules if not _covering(m, layers)]
    doubled = {m: c for m in modules if len(c := _covering(m, layers)) > 1}
    assert uncovered == [], f"modules in no layer of the import-linter contract: {uncovered}"
    assert doubled == {}, f"modules in more than one layer: {doubled}"


def test_top_level_holds_only_packages_and_the_shared_values() -> None:
    top = sorted(p.stem for p in (ROOT / "edge_agent").glob("*.py") if p.stem not in {"__init__", "__main__"})
    assert top == ["batching", "config", "errors", "fsutil", "metrics", "types"]


def test_take_batch_takes_what_is_queued_up_to_the_limit_and_sees_the_stop_sentinel() -> None:
    import queue

    from edge_agent.batching import take_batch

    q: queue.Queue[int | None] = queue.Queue()
    for i in (2, 3, 4):
        q.put(i)
    assert take_batch(q, 1, 3) == ([1, 2, 3], False)  # the limit counts the first item
    q.put(None)
    assert take_batch(q, 0, 10) == ([0, 4], True)
    assert take_batch(q, 5, 10) == ([5], False)  # empty: no waiting
