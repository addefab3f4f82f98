"""vesselseg: a reproducible DVC + MLflow pipeline for blood-vessel segmentation."""

from __future__ import annotations

import os

# Albumentations checks PyPI for a newer version on import: offline and slow.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

__version__ = "0.1.0"
