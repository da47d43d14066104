"""The one exception type for user mistakes.

Library code raises `ConfigError` for anything the user can fix (a bad option, a missing file,
unreachable storage); the CLI and the jobs print it as one line and exit with status 2. Any other
exception is a bug and keeps its traceback.
"""

import re
from collections.abc import Iterable

# A URL's user info: up to the last "@" before its path (a password may hold "@" or ":").
_USER_INFO = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)[^/\s?#]*@")


class ConfigError(ValueError):
    """A problem with the user's input, reported as one line without a traceback."""


def require(checks: Iterable[tuple[bool, str]]) -> None:
    """ConfigError with the message of the first (ok, message) pair that is not ok: a config's
    `validate()` as a table of conditions."""
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)


def redact(text: str) -> str:
    """`text` with the user info of every URL in it hidden: `http://user:secret@host:9000/x`
    becomes `http://***@host:9000/x`. Every message the CLI prints goes through it, so no
    credential typed into a URL comes back on a terminal or into a log."""
    return _USER_INFO.sub(r"\1***@", text)


def user_error(error: BaseException) -> str | None:
    """The message of the ConfigError behind a failed Ray call (a fit, a Ray Data read), if
    there is one: Ray wraps a
    worker's exception (and Ray Data a task's) in its own types, and the chain of causes
    survives only as the remote traceback's text."""
    todo, seen, texts = [error], set(), []
    while todo:
        current = todo.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        cause = getattr(current, "cause", None)  # RayTaskError: the remote exception
        if isinstance(current, ConfigError) and not isinstance(cause, BaseException):
            return str(current.args[0]) if current.args else str(current)
        texts.append(str(current))
        failures = getattr(current, "worker_failures", None) or {}  # WorkerGroupError
        base = getattr(current, "_base_exc", None)  # Ray Train's UserExceptionWithTraceback
        todo += [current.__context__, current.__cause__, cause, base, *failures.values()]
    for text in texts:  # the first (innermost) one a traceback names
        if found := re.search(r"^\S*(?:ConfigError|StorageUnreachable): (.+)$", text, re.M):
            return found.group(1)
    return None
