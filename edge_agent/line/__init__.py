"""The line: triggers, product recipes, deadlines and reject outputs (docs/agent.md#the-line).

- ``presence``: part-present detection on a camera stream by frame change (pure);
- ``outputs``: the :class:`~edge_agent.line.outputs.RejectSignal` interface and its adapters (MQTT event, HTTP
  webhook, Modbus TCP, GPIO via libgpiod), each run on its own lane thread;
- ``controller``: a trigger picks a recipe, the part is inspected by the recipe's pipeline, and the verdict, or
  the recipe's fail-safe at its deadline, is signalled once.
"""
