"""The MLflow model of a train run: a pyfunc that segments, registered by promote, linked by content."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tifffile
from PIL import Image

from tests.test_segment import fundus_rgb, tiny_model_file
from tests.test_tracking import make_repo
from vesselseg import segment as seg
from vesselseg.mlflow_model import (
    MODEL_RUN_TAG,
    MODEL_SHA_TAG,
    file_sha256,
    model_link_tags,
)
from vesselseg.tracking import MODEL_TAG, RunLogger

pytestmark = pytest.mark.slow  # one MLflow store + two pyfunc saves (~40 s) and a fresh process (~30 s)

PARAMS = {"data.dataset": "synthetic-fundus", "model.depth": 2}


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A repo whose train run logged a tiny model, an evaluate run linked to it, promoted to @champion."""
    from vesselseg.runs import promote

    base = tmp_path_factory.mktemp("mlmodel")
    repo = make_repo(base / "repo")
    model_file = tiny_model_file(repo / "model.pt")
    uri = f"sqlite:///{repo}/mlflow.db"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VESSELSEG_TRACKING", "1")
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        mp.delenv("DVC_ROOT", raising=False)
        mp.chdir(repo)
        # an older train run of the same commit with another model: the guess of old would pick the newest
        with RunLogger("train", "mlm", PARAMS) as train:
            train.log_model(model_file)
        with RunLogger("evaluate", "mlm", PARAMS) as ev:
            ev.set_tags(model_link_tags(model_file, uri=uri))
            ev.log_metrics({"test.dice": 0.7})
        other = tiny_model_file(base / "other.pt", steps=2)
        with RunLogger("train", "mlm", PARAMS) as newer:
            newer.log_model(other)
        result = promote(ev.run_id, name="vs-mlm", uri=uri)
    assert result.promoted
    return {
        "repo": repo,
        "uri": uri,
        "model": model_file,
        "train": train.run_id,
        "evaluate": ev.run_id,
        "newer": newer.run_id,
    }


def _client(uri: str) -> Any:
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def test_train_run_logs_a_pyfunc_model_with_signature_and_example(store: dict[str, Any]) -> None:
    from mlflow.models import Model

    c = _client(store["uri"])
    run = c.get_run(store["train"])
    assert run.data.tags[MODEL_TAG] == "model"
    assert run.data.tags[MODEL_SHA_TAG] == file_sha256(store["model"])
    local = c.download_artifacts(store["train"], "model", str(store["repo"] / "dl"))
    mlmodel = Model.load(local)
    assert "python_function" in mlmodel.flavors
    assert mlmodel.signature is not None and mlmodel.signature.inputs.inputs[0].shape == (-1, -1, 3)
    assert mlmodel.saved_input_example_info is not None


def test_evaluate_run_is_linked_to_the_model_it_evaluated_and_promote_registers_that_one(store: dict[str, Any]) -> None:
    c = _client(store["uri"])
    ev = c.get_run(store["evaluate"])
    assert ev.data.tags[MODEL_RUN_TAG] == store["train"]
    version = c.get_model_version_by_alias("vs-mlm", "champion")
    assert version.run_id == store["train"] != store["newer"]  # not the newest train run of the commit
    assert version.source.startswith(f"runs:/{store['train']}/model") or store["train"] in version.source


def test_champion_in_a_fresh_process_predicts_what_segment_writes(store: dict[str, Any], tmp_path: Path) -> None:
    image = fundus_rgb(11, size=90)
    Image.fromarray(image).save(tmp_path / "eye.png")
    np.save(tmp_path / "eye.npy", image)
    env = {**os.environ, "MLFLOW_TRACKING_URI": store["uri"], "PYTHONPATH": os.environ.get("PYTHONPATH", "")}
    code = (
        "import sys, numpy as np, mlflow\n"
        "m = mlflow.pyfunc.load_model('models:/vs-mlm@champion')\n"
        "np.save(sys.argv[2], m.predict(np.load(sys.argv[1])))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "eye.npy"), str(tmp_path / "probs.npy")],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    pyfunc = np.load(tmp_path / "probs.npy")
    seg.run_segment([tmp_path / "eye.png"], model=store["model"], out_dir=tmp_path / "out", probs_format="tiff")
    written = tifffile.imread(tmp_path / "out" / "eye_probs.tif")
    assert pyfunc.shape == written.shape == (90, 90)
    assert float(np.abs(pyfunc - written).max()) <= 1e-5


def test_segment_accepts_the_registry_uri(
    store: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store["uri"])
    Image.fromarray(fundus_rgb(12, size=80)).save(tmp_path / "x.png")
    res = seg.run_segment(
        [tmp_path / "x.png"], model="models:/vs-mlm@champion", out_dir=tmp_path / "a", probs_format="tiff"
    )
    assert res["failed"] == {}
    seg.run_segment([tmp_path / "x.png"], model=store["model"], out_dir=tmp_path / "b", probs_format="tiff")
    assert np.array_equal(
        tifffile.imread(tmp_path / "a" / "x_probs.tif"), tifffile.imread(tmp_path / "b" / "x_probs.tif")
    )
