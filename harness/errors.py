"""The one error type the CLI turns into a one-line message and a nonzero exit."""


class HarnessError(Exception):
    """Bad input or an impossible request.

    The message must fit on one line and say *what* is wrong (file, row, field or
    config key) and *what to do*. The CLI prints ``align-harness: error: <message>``
    and exits with status 2; nothing half-written is left behind.
    """


class SkipRun(Exception):
    """A run that cannot happen here (e.g. a hub checkpoint while offline).

    It becomes a ``skipped`` record carrying the message as its reason; the sweep goes on.
    """
