"""A real MLflow model for every trained vesselseg model: a pyfunc that segments an image.

``mlflow.pyfunc.load_model("models:/vesselseg@champion").predict(image)`` takes a
uint8 image as read from disk (H, W) or (H, W, 3) and returns the float32 probability
map (H, W) at the image's own size, exactly as ``vesselseg segment`` computes it: the
pyfunc applies the preprocessing spec stored in the model file through the same
:func:`vesselseg.segment.segment_image`, so the two cannot disagree.  The vesselseg
model file is the model's one artifact; the pyfunc only needs the vesselseg package
importable where it is loaded (as ``mlflow.pytorch`` needs torch).

Linking runs: the train run is tagged with the SHA-256 of the model file it logged
(:data:`MODEL_SHA_TAG`).  :func:`model_link_tags` gives an evaluate run the same
hash and the id of the train run that logged that exact file
(:data:`MODEL_RUN_TAG`), so promotion registers the model that was evaluated, found
by content, not the newest train run of the commit.
"""

from __future__ import annotations

import hashlib
import logging
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np

try:  # mlflow is a dependency, but importing it costs ~2 s: only the class needs it
    from mlflow.pyfunc import PythonModel
except ImportError:  # pragma: no cover - mlflow is pinned in pyproject
    PythonModel = object  # type: ignore[assignment,misc]

from vesselseg.errors import DataError

log = logging.getLogger(__name__)

__all__ = [
    "MODEL_RUN_TAG",
    "MODEL_SHA_TAG",
    "VesselsegPyfunc",
    "file_sha256",
    "find_model_run",
    "log_vesselseg_model",
    "model_link_tags",
    "save_vesselseg_model",
]

ARTIFACT_KEY = "model_file"
MODEL_SHA_TAG = "vesselseg.model_sha256"
MODEL_RUN_TAG = "vesselseg.model_run_id"


with warnings.catch_warnings():
    # MLflow warns at class creation that predict() has no type hints; see predict()
    warnings.simplefilter("ignore", UserWarning)

    class VesselsegPyfunc(PythonModel):
        """pyfunc: uint8 image (H, W[, 3]) -> float32 vessel probability (H, W) at native size."""

        def load_context(self, context: Any) -> None:
            from vesselseg.segment import load_predictor, model_tta, with_tta

            self._predictor = load_predictor(context.artifacts[ARTIFACT_KEY], device="cpu", backend="torch")
            # the model's own TTA, as `vesselseg segment` applies by default
            self._predict = with_tta(self._predictor, model_tta(self._predictor.spec))

        # no type hints on purpose: MLflow 3 reads them as a schema (and then mangles a
        # plain ndarray input); the signature saved with the model is the schema
        def predict(self, context, model_input, params=None):
            """uint8 image -> float32 (H, W) probabilities, as ``vesselseg segment`` writes them."""
            from vesselseg.segment import segment_image

            if isinstance(model_input, dict):  # a named-tensor call: {"image": array}
                model_input = next(iter(model_input.values()))
            image = np.asarray(model_input)
            if image.dtype != np.uint8:
                raise DataError(f"input must be a uint8 image (H, W) or (H, W, 3), got {image.dtype} {image.shape}")
            return segment_image(image, self._predict, self._predictor.spec).probs


def file_sha256(path: Path | str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _read_spec(model_path: Path) -> dict[str, Any]:
    from vesselseg.models import load_model
    from vesselseg.segment import missing_spec_error

    _, meta = load_model(model_path, map_location="cpu")
    spec = (meta.get("extra") or {}).get("preprocessing")
    if spec is None:
        raise missing_spec_error(model_path)
    return spec


def example_image(spec: dict[str, Any], size: int = 64) -> np.ndarray:
    """A small input example of the right kind: an RGB disc for photographs, grey for en-face maps.

    Small on purpose: MLflow stores the example as JSON next to the model.
    """
    yy, xx = np.mgrid[:size, :size]
    disc = ((yy - size / 2) ** 2 + (xx - size / 2) ** 2 <= (0.45 * size) ** 2).astype(np.uint8)
    grey = (disc * (120 + (xx * 3 + yy * 5) % 100)).astype(np.uint8)
    if spec.get("source") == "projection" or (
        spec.get("channel") == "grey" and spec.get("fov", {}).get("rule") == "full"
    ):
        return grey
    return np.stack([np.minimum(grey.astype(np.int32) + 60, 255) * disc, grey, grey // 3], axis=-1).astype(np.uint8)


def save_vesselseg_model(model_path: Path | str, dest: Path | str, input_example: np.ndarray | None = None) -> Path:
    """Write the pyfunc model folder (MLmodel, the model file, signature, input example) to ``dest``."""
    import mlflow
    import torch
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Schema, TensorSpec

    model_path = Path(model_path)
    spec = _read_spec(model_path)
    example = example_image(spec) if input_example is None else np.asarray(input_example)
    if example.dtype != np.uint8 or example.ndim not in (2, 3):
        raise DataError(f"input_example must be a uint8 (H, W) or (H, W, 3) image, got {example.dtype} {example.shape}")
    # every axis variable: any image size; the channel axis as the example has it.
    # Unnamed tensors, so predict() receives the plain array (a named one arrives as a dict)
    in_shape = (-1, -1) if example.ndim == 2 else (-1, -1, int(example.shape[2]))
    signature = ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.uint8), in_shape)]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, -1))]),
    )
    reqs = [
        f"mlflow=={mlflow.__version__}",
        f"torch=={torch.__version__.split('+')[0]}",
        f"numpy=={np.__version__}",
        "vesselseg",
    ]
    mlflow.pyfunc.save_model(
        str(dest),
        python_model=VesselsegPyfunc(),
        artifacts={ARTIFACT_KEY: str(model_path)},
        signature=signature,
        input_example=example,
        pip_requirements=reqs,
        metadata={"vesselseg_preprocessing": spec, MODEL_SHA_TAG: file_sha256(model_path)},
    )
    return Path(dest)


def log_vesselseg_model(
    model_path: Path | str,
    *,
    run_id: str | None = None,
    artifact_path: str = "model",
    input_example: np.ndarray | None = None,
    uri: str | None = None,
) -> str:
    """Log the pyfunc model of ``model_path`` into ``run_id`` (default: the active run); returns its URI.

    The pipeline logs through :meth:`vesselseg.tracking.RunLogger.log_model`, which
    calls :func:`save_vesselseg_model` and keeps working offline; this is for
    notebooks and scripts that hold an MLflow run of their own.
    """
    import mlflow
    from mlflow.tracking import MlflowClient

    active = None if run_id else mlflow.active_run()
    rid = run_id or (active.info.run_id if active else None)
    if rid is None:
        raise DataError("log_vesselseg_model: no run_id given and no active MLflow run")
    client = MlflowClient(tracking_uri=uri) if uri else MlflowClient()
    with tempfile.TemporaryDirectory(prefix="vesselseg-pyfunc-") as tmp:
        folder = save_vesselseg_model(model_path, Path(tmp) / artifact_path, input_example)
        client.log_artifacts(rid, str(folder), artifact_path)
    client.set_tag(rid, MODEL_SHA_TAG, file_sha256(model_path))
    return f"runs:/{rid}/{artifact_path}"


def find_model_run(client: Any, sha256: str, exclude: str | None = None) -> Any | None:
    """The newest train run that logged the model file with this content hash, or None."""
    experiments = [e.experiment_id for e in client.search_experiments()]
    if not experiments:
        return None
    runs = client.search_runs(
        experiments,
        filter_string=f"tags.`{MODEL_SHA_TAG}` = '{sha256}'",
        order_by=["attributes.start_time DESC"],
        max_results=50,
    )
    for run in runs:
        if run.info.run_id != exclude and run.data.tags.get("stage", "train") == "train":
            return run
    return None


def model_link_tags(model_path: Path | str, uri: str | None = None) -> dict[str, str]:
    """Tags that link an evaluate run to the model it evaluated, read from the model file.

    ``vesselseg.model_sha256`` always; ``vesselseg.model_run_id`` when a train run in
    the store logged that exact file.  The evaluate stage sets them with
    ``run.set_tags(model_link_tags(model_path))``.
    """
    from vesselseg.paths import default_tracking_uri

    model_path = Path(model_path)
    if not model_path.is_file():
        raise DataError(f"{model_path}: model file not found")
    sha = file_sha256(model_path)
    tags = {MODEL_SHA_TAG: sha}
    try:
        from mlflow.tracking import MlflowClient

        uri = uri or default_tracking_uri()
        run = find_model_run(MlflowClient(tracking_uri=uri), sha)
    except Exception as err:
        log.warning(
            "could not look up the train run of %s (%s)",
            model_path,
            str(err).splitlines()[0][:200] if str(err) else type(err).__name__,
        )
        run = None
    if run is not None:
        tags[MODEL_RUN_TAG] = run.info.run_id
    return tags


def linked_model_source(client: Any, run: Any) -> tuple[str, str] | None:
    """``(source URI, run id)`` of the model ``run`` is linked to by tags, or None.

    A run that logged a model itself links to itself; an evaluate run links through
    :data:`MODEL_RUN_TAG`, else through :data:`MODEL_SHA_TAG`.
    """
    from vesselseg.tracking import MODEL_DIR, MODEL_TAG

    tags = run.data.tags
    if tags.get(MODEL_TAG):
        return f"runs:/{run.info.run_id}/{MODEL_DIR}", run.info.run_id
    linked = None
    if tags.get(MODEL_RUN_TAG):
        linked = client.get_run(tags[MODEL_RUN_TAG])
    elif tags.get(MODEL_SHA_TAG):
        linked = find_model_run(client, tags[MODEL_SHA_TAG], exclude=run.info.run_id)
    if linked is None or not linked.data.tags.get(MODEL_TAG):
        return None
    return f"runs:/{linked.info.run_id}/{MODEL_DIR}", linked.info.run_id
