"""One module per user action: `register(subparsers)` adds its parser and sets `func=run`."""


class UserError(Exception):
    """An error the user can fix; printed as one message, no traceback, exit code 2."""
