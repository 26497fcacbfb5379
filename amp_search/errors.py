"""Typed errors of amp-search.

Every error a user can cause or meet derives from :class:`AmpSearchError`. Messages follow
Polygraphy's shape: what failed, expected versus got, what to do; then optional ``Note:``
lines with data. The CLI prints the first line (and the notes) and exits with the class's
``exit_code``, without a traceback unless ``--debug`` is given. Each class has one code, the
README's table lists them: 1 a runtime failure, 2 the user's input, 3 a backend or device
unusable here, 4 a build or run that failed outside a trial, 5 the study storage lost.

:class:`InternalError` is kept apart: it means a bug in amp-search itself.
"""

from __future__ import annotations

__all__ = [
    "AmpSearchError",
    "BackendUnavailableError",
    "CandidateBuildError",
    "CandidateRunError",
    "InternalError",
    "StorageUnavailableError",
    "UserInputError",
]


class AmpSearchError(Exception):
    """Root of every error amp-search raises on purpose.

    Attributes:
        exit_code: The process exit code the CLI uses for this error (1: runtime failure).
    """

    exit_code: int = 1

    def __init__(self, message: str, *, notes: list[str] | None = None) -> None:
        """Creates the error.

        Args:
            message: One line: what failed, expected vs. got, what to do.
            notes: Extra ``Note:`` lines with data (shown by the CLI under the message).
        """
        super().__init__(message)
        self.message = message
        self.notes = list(notes or [])

    def __str__(self) -> str:
        return "\n".join([self.message, *(f"Note: {n}" for n in self.notes)])


class UserInputError(AmpSearchError):
    """The user's input (model, data, flags) is wrong; the CLI exits with 2."""

    exit_code = 2


class BackendUnavailableError(AmpSearchError):
    """A backend, a device or an optional dependency cannot be used here; exit code 3."""

    exit_code = 3


class CandidateBuildError(AmpSearchError):
    """A candidate could not be built (session creation, engine build); the trial fails.

    Raised outside a trial (while the model is fitted to the target), the CLI exits 4.
    """

    exit_code = 4


class CandidateRunError(AmpSearchError):
    """A built candidate failed while running calibration data; the trial fails.

    Raised outside a trial (while the model is fitted to the target), the CLI exits 4.
    """

    exit_code = 4


class StorageUnavailableError(AmpSearchError):
    """The study storage stopped answering and did not come back in time; exit code 5."""

    exit_code = 5


class InternalError(Exception):
    """A bug in amp-search: an invariant it relies on did not hold."""
