"""Shared helpers of the `launch/` entry points: one clear line on bad input, no traceback."""

from __future__ import annotations

import sys
from collections.abc import Callable


def user_errors() -> tuple[type[BaseException], ...]:
    from jaxinterp.config import ConfigError
    from jaxinterp.data import DataError
    from jaxinterp.train import TrainingError

    return (ConfigError, DataError, TrainingError, FileNotFoundError, ValueError)


def run_main(main: Callable[[], int | None]) -> None:
    """Run `main`; a user error exits 2 with one line on stderr."""
    try:
        code = main()
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except user_errors() as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    sys.exit(code or 0)
