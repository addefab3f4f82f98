"""Logging set-up, done once by the CLI (never at import time)."""

from __future__ import annotations

import logging
import os

_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"


def setup_logging(debug: bool = False) -> None:
    level = logging.DEBUG if debug else getattr(logging, os.environ.get("VESSELSEG_LOG", "INFO").upper(), logging.INFO)
    logging.basicConfig(level=level, format=_FORMAT, datefmt="%H:%M:%S", force=True)
    for noisy in ("alembic", "urllib3", "matplotlib", "PIL", "git", "mlflow.store"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
