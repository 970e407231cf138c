"""The agent's composition root (service) and what the running agent does with its parts: restart recovery and
housekeeping (recovery), commands (control), health, and the start-up checks behind `run --check` (preflight)."""
