"""A user's mistake ends a Flower app as it ends the command line: one line, no traceback.

Flower logs an exception that leaves a ServerApp or a ClientApp with its traceback, and ends a
ServerApp with exit code 201 ("an unhandled exception"). A :class:`~iopfl.errors.UserError` (a moved
config key, a missing file) is not a crash: its record in Flower's log becomes the one line the CLI
prints, and the run still ends as failed, with the message as its details.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

from flwr.app.exception import AppExitException

from iopfl.errors import UserError


class DeploymentUserError(UserError, AppExitException):
    """A UserError that ends the ServerApp: Flower marks the run failed and, for an exit code below
    100, prints no "Exit Code" banner (that banner explains Flower's own failures)."""

    exit_code = 4


class OneLineUserErrors(logging.Filter):
    """Rewrites Flower's "<app> raised an exception" record of a UserError into its one-line message."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if isinstance(error, UserError):
            record.msg, record.args = "[iopfl] error: %s", (str(error),)
            record.exc_info, record.exc_text = None, None
        return True


ONE_LINE = OneLineUserErrors()


def log_user_errors_in_one_line() -> None:
    """Install the filter on Flower's logger (each app calls it once; a second call changes nothing)."""
    logging.getLogger("flwr").addFilter(ONE_LINE)


@contextmanager
def ending_the_run() -> Iterator[None]:
    """In the ServerApp: a UserError ends the run as failed, in one line (:class:`DeploymentUserError`)."""
    try:
        yield
    except DeploymentUserError:
        raise
    except UserError as err:
        raise DeploymentUserError(str(err)) from None
