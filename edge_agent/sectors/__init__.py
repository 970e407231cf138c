"""Sector logic: pure functions that turn a model :class:`~edge_agent.types.Result` into
what a farmer or an operator acts on (crop diagnosis, pass/fail, counts and zones).

Nothing here does I/O, starts threads or keeps globals.
"""
