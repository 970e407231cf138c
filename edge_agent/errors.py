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
    │   ├── InputNotFoundError        input_not_found
    │   ├── RecipeUnknownError        recipe_unknown (a line trigger named no configured recipe)
    │   └── DatasetError              dataset_invalid (a training folder's bad label, missing label file, ...)
    ├── RuntimeBackendError           runtime_error
    ├── StorageError                  storage_error
    │   ├── StorageFullError          storage_full
    │   ├── StoreUnavailableError     store_unavailable (coordinator store locked, down, I/O: retried with backoff)
    │   └── StoreRejectedError        store_rejected (coordinator store refused what a batch holds)
    ├── OverloadedError               overloaded (a bounded queue is full; retry later)
    ├── QuantizationGateError         quantization_refused (INT8 failed the accuracy-and-speed gate)
    ├── NoFrameError                  no_frame (a trigger without an image, and its camera has no frame yet)
    ├── MissingDependencyError        dependency_missing (an optional extra is not installed: the message names it)
    ├── FeedbackError                 feedback_invalid (operator feedback on an inspected part; docs/agent.md)
    │   ├── FeedbackUnknownError      feedback_unknown_result (no inspected part has that id)
    │   ├── FeedbackGoneError         feedback_image_gone (the part is known, its image no longer kept)
    │   └── FeedbackConflictError     feedback_kind_mismatch (false_reject on a passed part, missed_defect on a failed)
    └── UpdateError                   update_invalid (a signed model update refused; see docs/model-updates.md)
        ├── UpdateUnsignedError       update_unsigned
        ├── UpdateUntrustedKeyError   update_untrusted_key
        ├── UpdateBadSignatureError   update_bad_signature
        ├── UpdateCorruptError        update_corrupt (not a readable update archive, truncated, bad statement)
        ├── UpdateChecksumError       update_checksum_mismatch
        ├── UpdateUnsafePathError     update_unsafe_path (traversal, absolute path, link, device)
        ├── UpdateTooLargeError       update_too_large
        ├── UpdateManifestError       update_manifest_invalid
        ├── UpdateNotNewerError       update_not_newer
        ├── UpdateUnknownModelError   update_unknown_model
        ├── UpdateSmokeTestError      update_smoke_test_failed
        ├── UpdateNotFoundError       update_not_found (no such file in the drop folder)
        └── UpdateRollbackError       update_rollback_unavailable (nothing to roll back to)

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


class DatasetError(InputError):
    """A labelled training folder is unusable; the message names the file (and line)."""

    code = "dataset_invalid"


class RuntimeBackendError(EdgeAgentError):
    code = "runtime_error"


class StorageError(EdgeAgentError):
    code = "storage_error"


class StorageFullError(StorageError):
    code = "storage_full"


class StoreUnavailableError(StorageError):
    """The coordinator's store cannot be reached or written now (locked, down, I/O): retry the same batch later."""

    code = "store_unavailable"


class StoreRejectedError(StorageError):
    """The coordinator's store refused a batch because of what it holds: retrying the same data cannot help."""

    code = "store_rejected"


class OverloadedError(EdgeAgentError):
    code = "overloaded"


class QuantizationGateError(EdgeAgentError):
    """Quantization failed or the INT8 model did not pass the accuracy-and-speed gate; nothing was written."""

    code = "quantization_refused"

    def __init__(self, message: str, report: dict[str, object] | None = None) -> None:
        super().__init__(message)
        self.report = report or {}


class MissingDependencyError(EdgeAgentError):
    """A command needs a package of an optional extra (e.g. ``edge-agent[tools]``) that is not installed."""

    code = "dependency_missing"


class FeedbackError(EdgeAgentError):
    """Operator feedback that cannot be stored: a bad kind or field (``feedback_invalid``)."""

    code = "feedback_invalid"


class FeedbackUnknownError(FeedbackError):
    code = "feedback_unknown_result"


class FeedbackGoneError(FeedbackError):
    code = "feedback_image_gone"


class FeedbackConflictError(FeedbackError):
    code = "feedback_kind_mismatch"


def require_extra(module: str, extra: str, purpose: str) -> None:
    """Import ``module`` or raise :class:`MissingDependencyError` saying to install ``edge-agent[extra]``.

    The runtime install runs models; building them needs more: ``onnx`` (``tools``: quantize, inspect fit, detector
    graph surgery), ``matplotlib`` (``plot``: eval --plot), ``psycopg`` (``postgres``: the coordinator's PostgreSQL
    store).
    """
    import importlib

    try:
        importlib.import_module(module)
    except ImportError as exc:
        raise MissingDependencyError(
            f"{purpose} needs the {module} package, which is not installed: pip install 'edge-agent[{extra}]'"
        ) from exc


class UpdateError(EdgeAgentError):
    """A model update was refused; the running model was not touched. ``model``: its name, once known."""

    code = "update_invalid"
    model: str | None = None


class UpdateUnsignedError(UpdateError):
    code = "update_unsigned"


class UpdateUntrustedKeyError(UpdateError):
    code = "update_untrusted_key"


class UpdateBadSignatureError(UpdateError):
    code = "update_bad_signature"


class UpdateCorruptError(UpdateError):
    code = "update_corrupt"


class UpdateChecksumError(UpdateError):
    code = "update_checksum_mismatch"


class UpdateUnsafePathError(UpdateError):
    code = "update_unsafe_path"


class UpdateTooLargeError(UpdateError):
    code = "update_too_large"


class UpdateManifestError(UpdateError):
    code = "update_manifest_invalid"


class UpdateNotNewerError(UpdateError):
    code = "update_not_newer"


class UpdateUnknownModelError(UpdateError):
    code = "update_unknown_model"


class UpdateSmokeTestError(UpdateError):
    code = "update_smoke_test_failed"


class UpdateNotFoundError(UpdateError):
    code = "update_not_found"


class UpdateRollbackError(UpdateError):
    code = "update_rollback_unavailable"


class UpdateFetchError(UpdateError):
    """The update file could not be fetched from the coordinator (unreachable, HTTP error, wrong size, no base URL)."""

    code = "update_fetch_failed"


class RecipeUnknownError(InputError):
    code = "recipe_unknown"


class NoFrameError(EdgeAgentError):
    code = "no_frame"
