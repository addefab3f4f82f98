"""Classical baselines the CNNs are compared against.

* :mod:`~vesselseg.baselines.knn`: supervised k-NN on 3x3 neighbourhoods;
* :mod:`~vesselseg.baselines.vesselness`: unsupervised multi-scale Frangi filter
  with a threshold tuned on validation images.

Both produce the same ``(H, W)`` float32 probability-like maps in [0, 1] as the
networks, so predict/evaluate treat them alike.
"""

from __future__ import annotations

from vesselseg.baselines.knn import fit_knn, neighbourhood_features, predict_proba_image, sample_training_pixels
from vesselseg.baselines.vesselness import choose_threshold, frangi_vesselness

__all__ = [
    "choose_threshold",
    "fit_knn",
    "frangi_vesselness",
    "neighbourhood_features",
    "predict_proba_image",
    "sample_training_pixels",
]
