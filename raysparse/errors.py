"""User-facing errors: one line that names what was wrong and what was expected."""


class RaysparseError(Exception):
    """An error caused by the user's input (a spec field, a path, a model, a file).

    The CLI prints ``error: <message>`` and exits with status 2, with no traceback,
    so every message must stand on its own: name the field/file and what was expected.
    """


def expect(condition: bool, message: str) -> None:
    """Raise :class:`RaysparseError` with ``message`` unless ``condition`` holds."""
    if not condition:
        raise RaysparseError(message)


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message, for wrapping library errors in one line."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def last_line(exc: BaseException) -> str:
    """The last line of an exception's message: for errors that carry a traceback (Ray Tune's, Ray
    Train's worker failures), the line that says what was raised (``module.Error: message``)."""
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    return lines[-1] if lines else type(exc).__name__
