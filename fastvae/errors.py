"""Exceptions fastvae raises on purpose; each message says what went wrong and how to fix it."""


class BackendUnavailableError(RuntimeError):
    """The backend asked for cannot run these tensors here; the message says why and how to fix it."""
