"""The one exception type that skinclf's library code raises for bad input."""


class SkinclfError(Exception):
    """A problem the user can fix: the message names the bad value and what would be valid.

    Library code raises it; only `skinclf.cli` catches it, prints `Error: <message>` to stderr
    and exits with status 1.
    """


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during a long run, carrying what to do next ("finished rows are in X; run again with
    --resume"). A KeyboardInterrupt still, so every cleanup that catches one runs; the CLI prints
    `Interrupted: <hint>` once."""

    def __init__(self, hint: str) -> None:
        super().__init__(hint)
        self.hint = hint
