"""The coordinator: stores results from many devices exactly once and acknowledges them end to end."""
