"""The one exception type for user mistakes.

Library code raises `ConfigError` for anything the user can fix (a bad option, a missing file,
unreachable storage); the CLI and the jobs print it as one line and exit with status 2. Any other
exception is a bug and keeps its traceback.
"""

import re

# A URL's user info: up to the last "@" before its path (a password may hold "@" or ":").
_USER_INFO = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)[^/\s?#]*@")


class ConfigError(ValueError):
    """A problem with the user's input, reported as one line without a traceback."""


def redact(text: str) -> str:
    """`text` with the user info of every URL in it hidden: `http://user:secret@host:9000/x`
    becomes `http://***@host:9000/x`. Every message the CLI prints goes through it, so no
    credential typed into a URL comes back on a terminal or into a log."""
    return _USER_INFO.sub(r"\1***@", text)
