"""GPU backends: Modal (primary) and fal.ai (fallback)."""

from .base import Backend, BackendError, Dispatch, DispatchRequest

__all__ = ["Backend", "BackendError", "Dispatch", "DispatchRequest"]
