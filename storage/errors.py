"""Error types shared by every layer; each carries the exit code the CLI returns for it."""


class KdcacheError(Exception):
    """A failure the user can act on: the message names the bad value and the fix."""

    exit_code = 1


class UsageError(KdcacheError):
    """Bad options or inputs, caught before any work starts."""

    exit_code = 2


class LockedError(KdcacheError):
    """Another run holds the store; schedulers retry on EX_TEMPFAIL."""

    exit_code = 75


class FormatError(KdcacheError):
    """A store that is missing, incomplete, or of a format version this reader does not know."""


class IntegrityError(KdcacheError):
    """A store whose files do not match what its manifest recorded: rerunning cannot help, the
    store must be recomputed (EX_DATAERR from sysexits.h)."""

    exit_code = 65
