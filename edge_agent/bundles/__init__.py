"""Model bundles: the manifest schema (pure) and a bundle on disk (ONNX file + manifest.json, sha256 checked)."""
