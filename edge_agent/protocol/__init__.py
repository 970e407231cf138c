"""The wire protocol shared by agent and coordinator: payload codec, command parsing, JSON Schemas (pure)."""
