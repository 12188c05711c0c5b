"""What can go wrong with a call, as a small tree of precise exceptions.

The class says what the caller should do; the fields say what happened::

    ApiError                 failed; not known to be permanent (e.g. a malformed answer)
    ├── RetryableError       transient (throttled, 5xx, network); raised once retries ran out
    │   └── OutcomeUnknownError  the request went out and may have been applied
    ├── NotRunningError      the task is not running; try it again later
    ├── BadInputError        the server refused this task's parameters; wait for a new spec
    └── FatalError           credentials, permissions or configuration; stop the run
        └── UnreachableError every attempt failed to connect: the endpoint is down or wrong

:func:`classify` is a pure function from the server's answer (HTTP status and
error ``Code``) to one of these classes, so the mapping is tested without any
network. Transport failures use local codes (:data:`LOCAL_CODES`) that never
clash with the server's.

Messages are built only from the action, the code, the server's message and
its request id: request headers (and so the ``Authorization`` value, the secret
key and the session token) are never part of an error.
"""

from __future__ import annotations

from typing import Final

# Local codes for failures that have no server answer.
CONNECT_ERROR: Final = "ConnectError"
CONNECT_TIMEOUT: Final = "ConnectTimeout"
TIMEOUT: Final = "Timeout"
CONNECTION_DROPPED: Final = "ConnectionDropped"
MALFORMED_RESPONSE: Final = "MalformedResponse"
UNEXPECTED_RESULT: Final = "UnexpectedResult"
UNSUPPORTED_PROTOCOL: Final = "UnsupportedProtocol"
LOCAL_PROTOCOL_ERROR: Final = "LocalProtocolError"

LOCAL_CODES: Final = frozenset(
    {
        CONNECT_ERROR,
        CONNECT_TIMEOUT,
        TIMEOUT,
        CONNECTION_DROPPED,
        MALFORMED_RESPONSE,
        UNEXPECTED_RESULT,
        UNSUPPORTED_PROTOCOL,
        LOCAL_PROTOCOL_ERROR,
    }
)

NOT_RUNNING_CODE: Final = "InvalidParameter.ErrorActiveTaskNotFound"
THROTTLED_PREFIX: Final = "FlowLimitExceeded"

# Credentials, permissions and configuration: every later call would fail the same way.
_FATAL_CODES: Final = frozenset(
    {
        "SignatureDoesNotMatch",
        "InvalidAccessKey",
        "MissingAuthenticationToken",
        "MissingSignature",
        "InvalidTimestamp",
        "InvalidActionOrVersion",
        # Action/Version (or the identity) missing: our request is malformed,
        # and would be for every task.
        "MissingParameter",
        "InvalidAuthorization",
        "InvalidCredential",
        "InvalidSecurityToken",
        UNSUPPORTED_PROTOCOL,
    }
)
_RETRYABLE_CODES: Final = frozenset({"ServiceUnavailable", CONNECT_ERROR, CONNECT_TIMEOUT})
OUTCOME_UNKNOWN_CODES: Final = frozenset({TIMEOUT, CONNECTION_DROPPED})


class ApiError(Exception):
    """A call that did not end in success.

    ``code`` is the server's ``Code`` or one of :data:`LOCAL_CODES`;
    ``request_id`` and ``http_status`` are ``None`` when no answer came.
    """

    action: str
    code: str
    message: str
    request_id: str | None
    http_status: int | None
    attempts: int

    def __init__(
        self,
        *,
        action: str,
        code: str,
        message: str,
        request_id: str | None = None,
        http_status: int | None = None,
        attempts: int = 1,
    ) -> None:
        super().__init__(action, code, message)
        self.action = action
        self.code = code
        self.message = message
        self.request_id = request_id
        self.http_status = http_status
        self.attempts = attempts

    def __str__(self) -> str:
        notes = []
        if self.request_id:
            notes.append(f"RequestId {self.request_id}")
        if self.http_status is not None:
            notes.append(f"HTTP {self.http_status}")
        if self.attempts > 1:
            notes.append(f"after {self.attempts} attempts")
        tail = f" ({', '.join(notes)})" if notes else ""
        return f"{self.action} failed: {self.code}: {self.message}{tail}"

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(action={self.action!r}, code={self.code!r}, "
            f"message={self.message!r}, request_id={self.request_id!r}, "
            f"http_status={self.http_status!r}, attempts={self.attempts!r})"
        )

    def __reduce__(self) -> tuple[object, ...]:
        # Keyword-only __init__ needs help to survive pickling (e.g. across processes).
        return (_rebuild, (type(self), self.__dict__.copy()))

    @property
    def throttled(self) -> bool:
        """The server refused the call for going over the QPS limit."""
        return self.code.startswith(THROTTLED_PREFIX) or self.http_status == 429


def _rebuild(cls: type[ApiError], fields: dict[str, object]) -> ApiError:
    return cls(**fields)  # type: ignore[arg-type]


class RetryableError(ApiError):
    """A transient failure; raised only after every attempt failed."""


class OutcomeUnknownError(RetryableError):
    """The request was sent but no answer came: it may have been applied."""


class NotRunningError(ApiError):
    """``InvalidParameter.ErrorActiveTaskNotFound``: the task is not running."""


class BadInputError(ApiError):
    """The server refused the parameters; sending them again will not help."""


class FatalError(ApiError):
    """Credentials, permissions or configuration are wrong; stop the whole run."""


class UnreachableError(FatalError):
    """No attempt of a call could connect: every other call would fail the same way.

    Retrying task by task would print the same failure once per task and take
    the retries' time for each; stopping (``apply``) or pausing (the daemon)
    once says it once.
    """

    def __str__(self) -> str:
        # The message says it all ("cannot reach URL: connection refused"); the
        # action and the local code would only make it longer.
        tries = f" (after {self.attempts} attempts)" if self.attempts > 1 else ""
        return f"{self.message}{tries}"


class UnresponsiveError(UnreachableError):
    """The endpoint accepts connections and answers nothing within the timeout.

    A black hole (or a server far slower than ``--timeout``): every further
    request would wait as long, and an UpdateSegment that timed out may still
    land, so the run stops (``apply``) or pauses (the daemon) at once, and the
    calls left in doubt are read back before anything is sent to them again.
    """


class CallWithdrawn(Exception):
    """A call dropped before it was sent, because the run is stopping.

    Nothing reached the server and nothing was recorded; the task is planned
    again next time like any call never made.
    """

    def __init__(self, action: str) -> None:
        super().__init__(f"{action} withdrawn before it was sent: the run is stopping")
        self.action = action


def classify(*, http_status: int | None, code: str | None) -> type[ApiError]:
    """The exception class for a failed answer.

    The server's ``Code`` decides when it is known; otherwise the HTTP status
    does. An unknown code with a 2xx status (or no status at all) is a plain
    :class:`ApiError`: failed, but not known to be permanent or transient.
    """
    if code:
        if code == NOT_RUNNING_CODE:
            return NotRunningError
        if code in OUTCOME_UNKNOWN_CODES:
            return OutcomeUnknownError
        if (
            code in _RETRYABLE_CODES
            or code.startswith(THROTTLED_PREFIX)
            or code.startswith("InternalError")
        ):
            return RetryableError
        if code in _FATAL_CODES or code.startswith("AccessDenied"):
            return FatalError
        if code.startswith("InvalidParameter"):
            return BadInputError
    if http_status is None or http_status < 400:
        return ApiError
    if http_status in (408, 429) or http_status >= 500:
        return RetryableError
    if http_status in (401, 403, 404):
        # Unknown code, but these statuses mean "who you are" or "what you call".
        return FatalError
    # Any other 4xx with a code we do not know: failed, but not proof that the
    # task's own spec is bad (it is often our configuration), so it is tried
    # again later rather than blocked until the spec changes.
    return ApiError
