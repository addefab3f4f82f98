"""Pretrained models shipped inside the package, resolved by name by ``vesselseg segment``.

``fundus.pt`` (fundus photographs, trained on DRIVE) and ``octa.pt`` (OCTA en-face
maps, trained on OCTA-500 3M) are vesselseg model files that carry their
preprocessing spec; ``fundus.md`` / ``octa.md`` are their model cards (training data
and its terms, recipe, metrics, the command that reproduces them).  They are package
data (pyproject ``[tool.setuptools.package-data]``), so ``--model fundus`` works
offline after a plain install.  :func:`pretrained_path` is the one place the names
map to files.

A fundus card states its acceptance number on one line that
``tests/test_segment.py::test_shipped_fundus_model_reaches_its_model_card_on_drive``
reads back: ``DRIVE test F1 (FOV pooled, segment): 0.8312`` (the 20 DRIVE test images
through ``vesselseg segment --fov <DRIVE>/test/mask``, threshold from the model file).
The shipped files are made by the pipeline (their ``extra["preprocessing"]`` is
written by train) or re-saved with ``vesselseg upgrade-model``; never a test's toy.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

NAMES = ("fundus", "octa")


def pretrained_path(name: str) -> Path:
    """The file of shipped model ``name`` (it may be absent from a development checkout)."""
    if name not in NAMES:
        raise ValueError(f"unknown pretrained model {name!r} (one of {', '.join(NAMES)})")
    return Path(str(resources.files(__name__) / f"{name}.pt"))
