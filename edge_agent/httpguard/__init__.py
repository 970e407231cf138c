"""HTTP connection hardening shared by the agent's API server and the coordinator's: see ``httpguard.gate``."""
