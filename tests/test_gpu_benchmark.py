"""benchmarks/gpu.py on a machine without a GPU: it says so and succeeds; its code runs at toy sizes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu.py"


def _run(*args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    """Run the script in its own process group, ended whole on timeout (torchrun's workers too).

    CUDA_VISIBLE_DEVICES="" hides any GPU, so the CPU path is what runs, on any machine.
    """
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "NO_ALBUMENTATIONS_UPDATE": "1", "VESSELSEG_THREADS": "1"}
    cmd = [sys.executable, str(SCRIPT), *args]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"{' '.join(cmd)} ran over {timeout} s:\n{out[-2000:]}\n{err[-2000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def test_without_cuda_it_says_so_and_exits_0() -> None:
    res = _run(timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("no CUDA device found"), res.stdout
    assert "Traceback" not in res.stderr


@pytest.mark.slow
def test_smoke_run_on_the_cpu_fills_every_row(tmp_path: Path) -> None:
    """Every measurement (Trainer steps, predict_image at both sizes, DDP under torchrun
    with gloo) runs at toy sizes: the script itself works before a GPU is lent."""
    out = tmp_path / "gpu.json"
    res = _run("--device", "cpu", "--smoke", "--ddp", "--json", str(out), timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "GPU: none (CPU smoke run" in res.stdout
    rows = json.loads(out.read_text())["rows"]
    assert {(r["measure"], r["setting"]) for r in rows if r["measure"] == "train"} == {
        ("train", "fp32"),
        ("train", "AMP"),
        ("train", "AMP+channels_last"),
    }
    predict = {(r["setting"], r["batch / size"].split()[0]) for r in rows if r["measure"] == "predict"}
    assert predict == {(m, s) for m in ("fp32", "AMP+channels_last") for s in ("DRIVE", "HRF")}
    ddp = [r for r in rows if r["measure"] == "train DDP"]
    assert len(ddp) == 1, rows
    for r in rows:
        assert isinstance(r["value"], float) and r["value"] > 0, r
    assert all(r["measure"] in res.stdout and r["unit"] in res.stdout for r in rows)  # the table shows each row
