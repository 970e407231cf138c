"""Errors raised by edge-agent, each with a stable machine-readable code.

The tree::

    EdgeAgentError                    code
    ├── ConfigError                   config_invalid
    ├── ManifestError                 manifest_invalid
    │   └── ChecksumError             checksum_mismatch
    ├── ModelNotFoundError            model_not_found
    ├── InputError                    (abstract: bad input from outside)
    │   ├── ImageError                image_invalid
    │   │   ├── UnsupportedFormatError image_unsupported_format
    │   │   ├── ImageTooLargeError    image_too_large
    │   │   └── ImageEmptyError       image_empty
    │   └── InputNotFoundError        input_not_found
    ├── RuntimeBackendError           runtime_error
    ├── StorageError                  storage_error
    │   └── StorageFullError          storage_full
    ├── OverloadedError               overloaded (a bounded queue is full; retry later)
    └── QuantizationGateError         quantization_refused (INT8 failed the accuracy-and-speed gate)

Third-party errors are translated at the boundary with ``raise ... from exc``.
"""

from __future__ import annotations


class EdgeAgentError(Exception):
    """Base of every error edge-agent raises on purpose."""

    code = "internal_error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def to_dict(self) -> dict[str, str]:
        return {"code": self.code, "message": self.message}


class ConfigError(EdgeAgentError):
    code = "config_invalid"


class ManifestError(EdgeAgentError):
    code = "manifest_invalid"


class ChecksumError(ManifestError):
    code = "checksum_mismatch"


class ModelNotFoundError(EdgeAgentError):
    code = "model_not_found"


class InputError(EdgeAgentError):
    code = "input_invalid"


class ImageError(InputError):
    code = "image_invalid"


class UnsupportedFormatError(ImageError):
    code = "image_unsupported_format"


class ImageTooLargeError(ImageError):
    code = "image_too_large"


class ImageEmptyError(ImageError):
    code = "image_empty"


class InputNotFoundError(InputError):
    code = "input_not_found"


class RuntimeBackendError(EdgeAgentError):
    code = "runtime_error"


class StorageError(EdgeAgentError):
    code = "storage_error"


class StorageFullError(StorageError):
    code = "storage_full"


class OverloadedError(EdgeAgentError):
    code = "overloaded"


class QuantizationGateError(EdgeAgentError):
    """Quantization failed or the INT8 model did not pass the accuracy-and-speed gate; nothing was written."""

    code = "quantization_refused"

    def __init__(self, message: str, report: dict[str, object] | None = None) -> None:
        super().__init__(message)
        self.report = report or {}
