"""The error hierarchy. Each class carries the stable wire code of the MQTT contract."""

from __future__ import annotations


class EdgedError(Exception):
    """Base of every error edged reports to a person or a client.

    The message is a sentence a person can act on; ``code`` goes on the wire unchanged.
    """

    code = "internal"

    def __init__(self, message: str, *, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after_s = retry_after_s


class InvalidRequest(EdgedError):
    """Bad JSON, wrong types, unknown fields or roles, bad UTF-8, an empty prompt."""

    code = "invalid_request"


class TooLong(EdgedError):
    """The prompt does not fit the context budget, or the payload is over the size limit."""

    code = "too_long"


class Busy(EdgedError):
    code = "busy"


class Thermal(EdgedError):
    code = "thermal"


class Power(EdgedError):
    code = "power"


class RateLimited(EdgedError):
    code = "rate_limited"


class ModelUnavailable(EdgedError):
    """The model directory is missing, incomplete or fails its checksums."""

    code = "model_unavailable"


class Internal(EdgedError):
    code = "internal"


CODES = frozenset({EdgedError.code, *(cls.code for cls in EdgedError.__subclasses__())})  # the contract's codes
