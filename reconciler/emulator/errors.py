"""The emulated server's refusals: what ends up in ``ResponseMetadata.Error``.

Not to be confused with :mod:`reconciler.core.errors`, the *client's* view of a
failed call. Here an :class:`ApiFault` is raised anywhere along the request
pipeline (routing, signature, parameters, the task table) and turned into the
API's documented error answer in one place, :meth:`reconciler.emulator.server.Emulator`'s
handler. Keeping code, message and HTTP status together means each rule states
its whole answer where it is checked.
"""

from __future__ import annotations

from reconciler.core.task import TaskKey

__all__ = ["NOT_RUNNING_CODE", "ApiFault", "invalid", "not_running"]

NOT_RUNNING_CODE = "InvalidParameter.ErrorActiveTaskNotFound"


class ApiFault(Exception):
    """A request the server refuses: answered with ``ResponseMetadata.Error``."""

    def __init__(self, code: str, message: str, *, status: int) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.status = status


def invalid(message: str) -> ApiFault:
    """A bad parameter; the message names it."""
    return ApiFault("InvalidParameter", message, status=400)


def not_running(key: TaskKey) -> ApiFault:
    """The API's answer for a task that never ran, has ended, or is out of sight."""
    return ApiFault(
        NOT_RUNNING_CODE,
        f"task {key} does not exist or has already stopped",
        status=400,
    )
