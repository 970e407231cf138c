"""edge-agent: open, sovereign edge AI for farms and factories."""

__version__ = "0.1.0"
