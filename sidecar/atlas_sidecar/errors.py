"""Errors that callers can act on: each names what was wrong."""


class RequestError(ValueError):
    """A request is malformed or out of range; ``field`` names the offending field."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


class BackendUnavailable(RuntimeError):
    """The target backend (a remote server) cannot answer now; the request may be retried.

    Raised instead of returning a token that was not verified: the server answers it
    with UNAVAILABLE."""


class StepFailed(RuntimeError):
    """The engine failed on this request alone (its cause is chained); every other
    request of its batch was rolled back, stepped again without it, and went on."""
