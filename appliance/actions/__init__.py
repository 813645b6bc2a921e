"""One module per user action: `register(subparsers)` adds its parser and sets `func=run`."""
