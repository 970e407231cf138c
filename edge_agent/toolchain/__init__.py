"""Offline model tooling (not on the inference path): evaluation, INT8 quantization with its gate, the
anomaly fit, detector graph surgery and the benchmark harness."""
