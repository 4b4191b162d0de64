"""How natpg words an error: Config's list of problems on one line, another library's error by its first line;
and where its warnings point."""

from __future__ import annotations

import os
import sys
import warnings

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep
_TORCH_WRAPPERS = os.sep + os.path.join("torch", "utils", "_contextlib.py")  # torch.no_grad() around a function


def warn(message: str, category: type[Warning] = UserWarning) -> None:
    """``warnings.warn`` attributed to the first frame outside natpg (and the torch decorators around its functions):
    the user's line that called into natpg, whatever the depth of natpg's own calls (Python 3.12's
    ``skip_file_prefixes``, by hand for 3.11)."""
    frame, level = sys._getframe(1), 2
    while frame is not None and (frame.f_code.co_filename.startswith(_PACKAGE_DIR)
                                 or frame.f_code.co_filename.endswith(_TORCH_WRAPPERS)):
        frame, level = frame.f_back, level + 1
    warning = category(message)
    warning.from_natpg = True  # what natpg train prints as one line of its own (cli.main), wherever it points
    warnings.warn(warning, stacklevel=level)


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
