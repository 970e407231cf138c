"""`python -m edge_agent.cli`: the same as the `edge-agent` command."""

from edge_agent.cli.main import main

main()
