"""vesselseg export: ONNX / TorchScript with dynamic sizes, equal to torch, usable by segment alone."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.test_segment import fundus_rgb, tiny_model_file
from vesselseg import segment as seg
from vesselseg.cli import main
from vesselseg.errors import DataError

pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def model_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_model_file(tmp_path_factory.mktemp("model") / "model.pt")


def _torch_probs(model_path: Path, x: torch.Tensor) -> np.ndarray:
    from vesselseg.inference.predict import foreground_probability
    from vesselseg.models import load_model

    model, _ = load_model(model_path)
    with torch.no_grad():
        return foreground_probability(model(x)).numpy()


def _assert_export_matches_torch(model_file: Path, out: Path, fmt: str, shapes: tuple[tuple[int, int], ...]) -> None:
    import onnxruntime as ort

    from vesselseg.export import read_torchscript_spec

    main(["export", "--model", str(model_file), "--format", fmt, "--out", str(out)])
    gen = torch.Generator().manual_seed(0)
    for shape in shapes:
        x = torch.rand(1, 1, *shape, generator=gen)
        expected = _torch_probs(model_file, x)
        if fmt == "onnx":
            sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
            got = sess.run(None, {"image": x.numpy()})[0]
        else:
            module, spec = read_torchscript_spec(out)
            assert spec is not None and spec["version"] == 1
            with torch.no_grad():
                got = module(x).numpy()
        assert got.shape == expected.shape == (1, 1, *shape)
        assert float(np.abs(got - expected).max()) <= 1e-4


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_export_matches_torch_on_drive_size_and_odd_size(model_file: Path, tmp_path: Path, fmt: str) -> None:
    out = tmp_path / f"m.{'onnx' if fmt == 'onnx' else 'ts'}"
    _assert_export_matches_torch(model_file, out, fmt, ((584, 565), (101, 77)))


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_export_of_a_wnet_matches_torch(tmp_path: Path, fmt: str) -> None:
    """model.stacks 2: the exported graph is the eval-mode W-Net (final stage only)."""
    from tests.test_segment import TINY, tiny_spec
    from vesselseg.models import build_model, save_model

    torch.manual_seed(0)
    config = {**TINY, "stacks": 2}
    model_file = tmp_path / "wnet.pt"
    save_model(model_file, build_model(config).eval(), config, extra={"preprocessing": tiny_spec()})
    out = tmp_path / f"w.{'onnx' if fmt == 'onnx' else 'ts'}"
    _assert_export_matches_torch(model_file, out, fmt, ((101, 77),))


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_exported_file_alone_runs_through_segment(model_file: Path, tmp_path: Path, fmt: str) -> None:
    out = tmp_path / f"m.{'onnx' if fmt == 'onnx' else 'ts'}"
    main(["export", "--model", str(model_file), "--format", fmt, "--out", str(out)])
    Image.fromarray(fundus_rgb(0, size=101)).save(tmp_path / "odd.png")
    main(["segment", str(tmp_path / "odd.png"), "--model", str(out), "--out", str(tmp_path / "exp")])
    main(["segment", str(tmp_path / "odd.png"), "--model", str(model_file), "--out", str(tmp_path / "pt")])
    a = np.asarray(Image.open(tmp_path / "exp" / "odd_probs.png")).astype(np.int64)
    b = np.asarray(Image.open(tmp_path / "pt" / "odd_probs.png")).astype(np.int64)
    assert a.shape == (101, 101)
    assert np.abs(a - b).max() <= 7  # 1e-4 of the 16-bit range
    predictor = seg.load_predictor(out)
    assert predictor.backend == ("onnx" if fmt == "onnx" else "torchscript")


def test_onnx_backend_on_a_model_file_matches_torch(model_file: Path) -> None:
    image = fundus_rgb(3, size=90)
    torch_pred = seg.load_predictor(model_file, device="cpu", backend="torch")
    onnx_pred = seg.load_predictor(model_file, backend="onnx")
    a = seg.segment_image(image, torch_pred, torch_pred.spec).probs
    b = seg.segment_image(image, onnx_pred, onnx_pred.spec).probs
    assert float(np.abs(a - b).max()) <= 1e-4


def test_export_refuses_a_model_without_spec_and_an_onnx_without_metadata(tmp_path: Path) -> None:
    old = tiny_model_file(tmp_path / "old.pt", spec=False, steps=1)
    with pytest.raises(DataError, match="no preprocessing spec"):
        main(["--debug", "export", "--model", str(old), "--format", "onnx", "--out", str(tmp_path / "x.onnx")])
    assert not (tmp_path / "x.onnx").exists()
    import onnx

    from vesselseg.export import onnx_bytes
    from vesselseg.models import load_model

    model, meta = load_model(old)
    (tmp_path / "bare.onnx").write_bytes(onnx_bytes(model, meta["config"], None))
    assert onnx.load(str(tmp_path / "bare.onnx")).graph.input[0].name == "image"
    with pytest.raises(DataError, match=r"bare\.onnx: ONNX file has no vesselseg.preprocessing metadata"):
        seg.load_predictor(tmp_path / "bare.onnx")
