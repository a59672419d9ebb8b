"""The one exception type that means "the user asked for something impossible"."""


class UsageError(Exception):
    """A user mistake (bad config value, missing input, wrong file). The CLI prints it as one line and exits 2."""
