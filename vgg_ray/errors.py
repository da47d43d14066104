"""The one exception type for user mistakes.

Library code raises `ConfigError` for anything the user can fix (a bad option, a missing file,
unreachable storage); the CLI and the jobs print it as one line and exit with status 2. Any other
exception is a bug and keeps its traceback.
"""


class ConfigError(ValueError):
    """A problem with the user's input, reported as one line without a traceback."""
