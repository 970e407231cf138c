"""The vision core: untrusted bytes -> Image (decode), Image -> tensor (preprocess), onnxruntime (runtime),
raw outputs -> predictions (postprocess), and the Model that strings them together (model)."""
