"""edge-agent benchmarks: ``python -m benchmarks.run [--quick]``."""
