"""Credentials shared by the agent's and the coordinator's HTTP sides (bearer tokens)."""
