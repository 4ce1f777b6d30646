"""The one exception type users see: the CLI prints its message on one line, never a traceback."""


class DiffinvError(Exception):
    """A problem with the user's input, model or files, with a message that names it and says what to do."""
