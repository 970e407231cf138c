"""The `edge-agent` command line: thin typer commands that parse arguments, configure logging and call one function."""

from edge_agent.cli.main import app, main

__all__ = ["app", "main"]
