"""Exception types shared across slmopt.

User mistakes raise ``ValueError``/``TypeError`` (the CLI maps them to exit code 2); a failure inside a pass
is wrapped in :class:`PassError`, which names the pass and the passes that ran before it.
"""

from __future__ import annotations

__all__ = ["DistributedError", "PassError", "UserError"]


class UserError(ValueError):
    """A problem with what the user asked for or handed in (bad path, bad option, bad data)."""


class PassError(RuntimeError):
    """A pass failed; the message names the pass and its predecessors, the cause is chained.

    Example:
        >>> err = PassError("fff", ["mask-2to4"], ValueError("no FFN found"))
        >>> str(err)
        "pass 'fff' failed (after: mask-2to4): no FFN found"
    """

    def __init__(self, pass_name: str, before: list[str], cause: BaseException) -> None:
        after = f" (after: {', '.join(before)})" if before else ""
        super().__init__(f"pass {pass_name!r} failed{after}: {cause}")
        self.pass_name = pass_name
        self.before = list(before)
        self.cause = cause


class DistributedError(RuntimeError):
    """A multi-process run failed: a rank died, timed out, or could not join (one-line message)."""
