"""How natpg words an error: Config's list of problems on one line, another library's error by its first line."""

from __future__ import annotations


def one_line(message: str) -> str:
    """Config's list of problems ('invalid settings:\n  a\n  b') as the command line prints it: 'invalid settings:
    a; b'. Other lines are kept (a worker's error as it came)."""
    return message.replace(":\n  ", ": ", 1).replace("\n  ", "; ")


def install_hint(extra: str) -> str:
    """How to install one of natpg's optional extras (pyproject.toml): natpg installs from its source directory."""
    return f"pip install -e \".[{extra}]\" in natpg's source directory"


def first_line(error: BaseException | str) -> str:
    """The first line of an error's text ('' when it has none), to quote it inside natpg's own message."""
    text = str(error)
    return text.splitlines()[0] if text.strip() else ""
