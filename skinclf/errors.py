"""The one exception type that skinclf's library code raises for bad input."""


class SkinclfError(Exception):
    """A problem the user can fix: the message names the bad value and what would be valid.

    Library code raises it; only `skinclf.cli` catches it, prints `Error: <message>` to stderr
    and exits with status 1.
    """
