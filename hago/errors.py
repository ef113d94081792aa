"""Errors hago raises. Each one names the file, field or node it is about.

Every error a user can cause (a broken spec, a corrupt model, NaNs in the
calibration data, an unreachable device) is a :class:`HagoError`; the CLI
prints its message without a traceback.
"""
from __future__ import annotations


class HagoError(Exception):
    """Base class of all errors hago reports to users."""


class SpecError(HagoError):
    """A hardware spec is malformed. The message names the file and JSON path."""

    def __init__(self, message: str, *, file: str | None = None, path: str | None = None):
        self.file = file
        self.path = path
        where = ""
        if file:
            where += f"{file}"
        if path:
            where += f" at {path}" if where else f"at {path}"
        super().__init__(f"{where}: {message}" if where else message)


class ModelError(HagoError):
    """A model cannot be loaded or transformed. The message names the file or node."""


class CalibrationError(HagoError):
    """Calibration data is unusable (NaN/Inf, wrong names, wrong shapes)."""


class CompileError(HagoError):
    """Code generation failed for a target."""


class DeviceError(HagoError):
    """A measurement device (local, RPC) cannot be reached or fails."""


class SearchError(HagoError):
    """A search cannot start or resume (e.g. a log from another model)."""
