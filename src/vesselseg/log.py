"""Logging set-up, done once by the CLI (never at import time)."""

from __future__ import annotations

import logging
import os
import sys

_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"


class _CurrentStderr(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is *now*.

    A plain StreamHandler keeps the stream it was created with; when the CLI runs
    in-process (tests, notebooks) under a redirected stderr that is later closed, every
    later log line would fail with "Logging error".
    """

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stderr
        super().emit(record)


def setup_logging(debug: bool = False) -> None:
    level = logging.DEBUG if debug else getattr(logging, os.environ.get("VESSELSEG_LOG", "INFO").upper(), logging.INFO)
    handler = _CurrentStderr()
    handler.setFormatter(logging.Formatter(_FORMAT, datefmt="%H:%M:%S"))
    logging.basicConfig(level=level, handlers=[handler], force=True)
    for noisy in ("alembic", "urllib3", "matplotlib", "PIL", "git", "mlflow.store"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
