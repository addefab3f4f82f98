"""The pull-request report: what changed between two revisions, and what it did.

Everything is read from git (``git show REV:path``), never from the DVC cache: the
small metrics and plots files are ``cache: false`` DVC outputs committed to git, so a
CI runner with no DVC remote can still compare a branch against its base.  ``dvc
metrics diff`` would do part of this but needs a DVC install and cache state; the
git route works in any clone.  Missing files are reported in the markdown, never
raised: a first commit has no metrics yet, and that is worth saying, not crashing.
"""

from __future__ import annotations

import io
import json
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from vesselseg import atomic
from vesselseg.errors import DataError
from vesselseg.params import flatten
from vesselseg.paths import git

log = logging.getLogger(__name__)

__all__ = ["build_report", "default_base", "plot_curves", "plot_history"]

PARAMS_FILE = "params.yaml"
EVAL_METRICS = "reports/metrics.json"
TRAIN_METRICS = "reports/train/metrics.json"
HISTORY = "reports/train/history.csv"
ROC = "reports/plots/roc.csv"
PR = "reports/plots/pr.csv"
OVERLAYS = "reports/figures/overlays"
# Columns of the per-dataset table: pixel metrics, then topology (vesselseg.topology),
# which shows broken or spurious vessels that pixel Dice hardly registers.
HEADLINE = ("dice", "auc_roc", "sensitivity", "specificity", "cldice", "betti0_error", "betti1_error", "cal")


def _commit(repo: Path, rev: str) -> str | None:
    out = git(repo, "rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}")
    return out.strip() if out else None


@dataclass
class _Rev:
    """One side of the comparison: a commit, or the workspace (``sha`` = HEAD)."""

    repo: Path
    role: str
    sha: str | None
    workspace: bool = False
    missing: list[str] = field(default_factory=list)

    @property
    def label(self) -> str:
        short = self.sha[:8] if self.sha else "none"
        return f"workspace (HEAD {short})" if self.workspace else short

    def read(self, path: str) -> str | None:
        if self.workspace:
            file = self.repo / path
            text = file.read_text(encoding="utf-8") if file.is_file() else None
        elif self.sha:
            text = git(self.repo, "show", f"{self.sha}:{path}")
        else:
            text = None
        if text is None:
            self.missing.append(path)
        return text

    def json(self, path: str) -> dict[str, Any]:
        text = self.read(path)
        if text is None:
            return {}
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise DataError(f"{path} at {self.label}: malformed JSON ({err.msg}, line {err.lineno})") from None
        return data if isinstance(data, dict) else {}

    def yaml(self, path: str) -> dict[str, Any]:
        text = self.read(path)
        if text is None:
            return {}
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as err:
            raise DataError(f"{path} at {self.label}: malformed YAML ({err})") from None
        return data if isinstance(data, dict) else {}

    def csv(self, path: str) -> pd.DataFrame | None:
        text = self.read(path)
        if text is None:
            return None
        try:
            return pd.read_csv(io.StringIO(text))
        except (ValueError, pd.errors.ParserError) as err:
            raise DataError(f"{path} at {self.label}: malformed CSV ({err})") from None


def default_base(repo: Path, new_sha: str | None, workspace: bool) -> tuple[str | None, str | None]:
    """``git merge-base HEAD main`` (or ``origin/main`` in a CI clone); else HEAD~1, else HEAD, with a note."""
    head = _commit(repo, "HEAD")
    merge = ""
    for branch in ("main", "origin/main"):
        merge = (git(repo, "merge-base", "HEAD", branch) or "").strip()
        if merge:
            break
    # The workspace against its own HEAD is a real comparison (an uncommitted run);
    # a commit against itself is not.
    if merge and (workspace or merge != new_sha):
        return merge, None
    why = "no branch `main` to branch off" if not merge else "the compared commit is the merge base with `main`"
    parent = _commit(repo, f"{new_sha or head}~1") if (new_sha or head) else None
    if parent:
        return parent, f"Base defaulted to the parent commit ({why})."
    return head, f"Base defaulted to HEAD ({why}, and no parent commit)."


def _metrics(rev: _Rev) -> dict[str, Any]:
    out = flatten(rev.json(EVAL_METRICS))
    out.update(flatten(rev.json(TRAIN_METRICS), "train."))
    return out


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def fmt(value: Any) -> str:
    """Table cell text: ints as they are, floats with 4 decimals (scientific if tiny/huge)."""
    if value is None:
        return "—"
    if isinstance(value, bool) or not _is_num(value):
        return str(value)
    if isinstance(value, int):
        return str(value)
    if math.isnan(value):
        return "nan"
    if value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e5):
        return f"{value:.3e}"
    return f"{value:.4f}"


def _delta(old: Any, new: Any) -> str:
    if not (_is_num(old) and _is_num(new)):
        return "—"
    d = new - old
    if isinstance(d, int):
        return f"{d:+d}"
    if d != 0 and (abs(d) < 1e-3 or abs(d) >= 1e5):
        return f"{d:+.3e}"
    return f"{d:+.4f}"


def _table(header: list[str], rows: list[list[str]]) -> str:
    from vesselseg.runs import markdown_table

    return markdown_table(header, rows)


# ------------------------------------------------------------------- figures


def _save(fig: Any, target: Path) -> None:
    atomic.write_with(target, lambda tmp: fig.savefig(tmp, format="png", dpi=100))


def _figure(ncols: int, width: float = 5.0) -> tuple[Any, list[Any]]:
    # Figure() with no pyplot: Agg canvas, no global backend switch, no GUI.
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * ncols, 4.0), layout="constrained")
    axes = [fig.add_subplot(1, ncols, i + 1) for i in range(ncols)]
    return fig, axes


_STYLE: dict[str, dict[str, Any]] = {"base": dict(linestyle="--", alpha=0.8), "new": dict(linestyle="-")}


def plot_history(histories: Mapping[str, tuple[str, pd.DataFrame | None]], target: Path) -> bool:
    """Loss and validation Dice per epoch, base dashed, new solid; False if no data."""
    if all(h is None for _, h in histories.values()):
        return False
    fig, (ax_loss, ax_dice) = _figure(2)
    for role, (label, hist) in histories.items():
        if hist is None or "epoch" not in hist:
            continue
        for col, colour in (("train_loss", "C0"), ("val_loss", "C1")):
            if col in hist:
                ax_loss.plot(hist["epoch"], hist[col], color=colour, label=f"{col} {role} {label}", **_STYLE[role])
        if "val_dice" in hist:
            ax_dice.plot(hist["epoch"], hist["val_dice"], color="C2", label=f"val_dice {role} {label}", **_STYLE[role])
    from matplotlib.ticker import MaxNLocator

    ax_loss.set(xlabel="epoch", ylabel="loss", title="Loss")
    ax_dice.set(xlabel="epoch", ylabel="Dice", title="Validation Dice")
    for ax in (ax_loss, ax_dice):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    _save(fig, target)
    return True


def plot_curves(
    curves: Mapping[str, tuple[str, pd.DataFrame | None]], x: str, y: str, title: str, target: Path
) -> bool:
    """One line per (revision, split); False if neither revision has the file."""
    if all(c is None for _, c in curves.values()):
        return False
    fig, (ax,) = _figure(1, 5.5)
    for role, (label, df) in curves.items():
        if df is None or x not in df or y not in df:
            continue
        splits = df["split"].unique() if "split" in df else [None]
        for i, split in enumerate(splits):
            part = df if split is None else df[df["split"] == split]
            part = part.sort_values(x, kind="stable")
            ax.plot(part[x], part[y], color=f"C{i}", label=f"{split or ''} {role} {label}".strip(), **_STYLE[role])
    if x == "fpr":
        ax.plot([0, 1], [0, 1], color="grey", linewidth=0.5)
    ax.set(xlabel=x, ylabel=y, title=title, xlim=(0, 1), ylim=(0, 1.01))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    _save(fig, target)
    return True


# -------------------------------------------------------------------- report


def _params_section(base: _Rev, new: _Rev) -> tuple[str, dict[str, Any], dict[str, Any]]:
    old_p = flatten(base.yaml(PARAMS_FILE))
    new_p = flatten(new.yaml(PARAMS_FILE))
    keys = sorted(k for k in set(old_p) | set(new_p) if old_p.get(k, _ABSENT) != new_p.get(k, _ABSENT))
    if not keys:
        return "No params changed.", old_p, new_p
    rows = [[f"`{k}`", _pfmt(old_p.get(k, _ABSENT)), _pfmt(new_p.get(k, _ABSENT))] for k in keys]
    return _table(["param", f"base {base.label}", f"new {new.label}"], rows), old_p, new_p


class _Absent:
    def __repr__(self) -> str:
        return "absent"


_ABSENT = _Absent()


def _pfmt(v: Any) -> str:
    if v is _ABSENT:
        return "(absent)"
    return json.dumps(v) if isinstance(v, (list, dict)) or v is None else str(v)


def _metrics_section(base: _Rev, new: _Rev) -> str:
    old_m, new_m = _metrics(base), _metrics(new)
    keys = sorted(set(old_m) | set(new_m))
    if not keys:
        return "No metrics at either revision."
    rows = [[f"`{k}`", fmt(old_m.get(k)), fmt(new_m.get(k)), _delta(old_m.get(k), new_m.get(k))] for k in keys]
    return _table(["metric", f"base {base.label}", f"new {new.label}", "delta"], rows)


def _dataset_section(revs: list[tuple[_Rev, dict[str, Any]]]) -> str:
    rows = []
    splits = ("test", "val")
    for rev, params in revs:
        metrics = flatten(rev.json(EVAL_METRICS))
        row = [str(params.get("data.dataset", "unknown")), f"{rev.role} {rev.label}"]
        for split in splits:
            row.append(fmt(metrics.get(f"{split}.n_images")))
            row.extend(fmt(metrics.get(f"{split}.{m}")) for m in HEADLINE)
        rows.append(row)
    header = ["dataset", "revision"]
    for split in splits:
        header += [f"{split} n_images"] + [f"{split} {m}" for m in HEADLINE]
    text = _table(header, sorted(rows, key=lambda r: r[0]))
    if len({r[0] for r in rows}) > 1:
        text += "\n\n**The two revisions use different datasets: their metrics are not directly comparable.**"
    return text


def _mlflow_section(base: _Rev, new: _Rev, uri: str | None) -> str:
    from vesselseg.paths import default_tracking_uri
    from vesselseg.runs import side_by_side, sqlite_missing, to_markdown

    uri = uri or default_tracking_uri(base.repo)
    if sqlite_missing(uri):
        return f"No MLflow store at `{uri}`."
    if not (base.sha and new.sha):
        return "No commit to look up MLflow runs for."
    try:
        df = side_by_side([base.sha, new.sha], uri=uri, labels=[f"base {base.label}", f"new {new.label}"])
    except Exception as err:  # tracking is a nice-to-have in the report, never a blocker
        log.warning("MLflow runs not read from %s: %s", uri, err)
        return f"MLflow runs could not be read from `{uri}` ({type(err).__name__})."
    if df.empty or df.isna().all().all():
        return f"No MLflow runs tagged with either commit in `{uri}`."
    note = "\n\n(Workspace runs are tagged with HEAD's commit.)" if new.workspace else ""
    return to_markdown(df.rename_axis("metric"), index=True) + note


def build_report(
    *,
    base: str | None = None,
    rev: str | None = None,
    out_dir: Path,
    repo: Path,
    uri: str | None = None,
) -> Path:
    """Write ``out_dir/report.md`` and its PNG figures comparing ``base`` with ``rev``.

    ``rev=None`` is the workspace (what CI has after ``dvc repro``/``dvc pull``);
    ``base=None`` is ``git merge-base HEAD main``.  ``uri`` is the MLflow store whose
    runs of both commits are shown side by side.  Returns the markdown path.
    """
    repo = Path(repo).resolve()
    top = git(repo, "rev-parse", "--show-toplevel")
    if top is None:
        raise DataError(f"{repo}: not a git repository")
    repo = Path(top.strip())
    out_dir = Path(out_dir)
    notes: list[str] = []

    if rev is None:
        new = _Rev(repo, "new", _commit(repo, "HEAD"), workspace=True)
    else:
        sha = _commit(repo, rev)
        if sha is None:
            raise DataError(f"--rev {rev!r}: no such commit in {repo}")
        new = _Rev(repo, "new", sha)
    if base is None:
        base_sha, note = default_base(repo, new.sha, new.workspace)
        if note:
            notes.append(note)
    else:
        base_sha = _commit(repo, base)
        if base_sha is None:
            raise DataError(f"--base {base!r}: no such commit in {repo}")
    old = _Rev(repo, "base", base_sha)

    params_md, old_params, new_params = _params_section(old, new)
    metrics_md = _metrics_section(old, new)
    dataset_md = _dataset_section([(old, old_params), (new, new_params)])
    mlflow_md = _mlflow_section(old, new, uri)

    out_dir.mkdir(parents=True, exist_ok=True)
    figures: list[tuple[str, str]] = []
    both = {"base": old, "new": new}
    if plot_history({k: (r.label, r.csv(HISTORY)) for k, r in both.items()}, out_dir / "training_curves.png"):
        figures.append(("Training curves (base dashed, new solid)", "training_curves.png"))
    roc = {k: (r.label, r.csv(ROC)) for k, r in both.items()}
    if plot_curves(roc, "fpr", "tpr", "ROC", out_dir / "roc.png"):
        figures.append(("ROC (base dashed, new solid)", "roc.png"))
    pr = {k: (r.label, r.csv(PR)) for k, r in both.items()}
    if plot_curves(pr, "recall", "precision", "Precision-recall", out_dir / "pr.png"):
        figures.append(("Precision-recall (base dashed, new solid)", "pr.png"))
    overlay = _copy_overlay(new, out_dir)
    if overlay:
        figures.append((f"Prediction overlay `{overlay}` (workspace)", "overlay.png"))

    missing = [f"- `{path}` absent at {r.role} {r.label}" for r in (old, new) for path in dict.fromkeys(r.missing)]
    if not overlay:
        missing.append(f"- no `{OVERLAYS}/*.png` in the workspace (overlays are DVC-cached, not in git)")

    parts = [
        "# vesselseg report",
        "",
        f"Base: `{old.sha or 'none'}` — new: {'workspace on ' if new.workspace else ''}`{new.sha or 'none'}`",
        "",
        *[f"> {n}\n" for n in notes],
        "## Params changed",
        "",
        params_md,
        "",
        "## Metrics",
        "",
        metrics_md,
        "",
        "## Per dataset",
        "",
        dataset_md,
        "",
        "## MLflow runs (newest run of each stage per commit)",
        "",
        mlflow_md,
        "",
        "## Figures",
        "",
        *(
            [f"### {title}\n\n![{title}]({name})\n" for title, name in figures]
            or ["No figures: no data at either revision.", ""]
        ),
        "## Missing files",
        "",
        *(missing or ["None."]),
        "",
    ]
    target = out_dir / "report.md"
    atomic.write_text(target, "\n".join(parts))
    log.info("report written to %s", target)
    return target


def _copy_overlay(new: _Rev, out_dir: Path) -> str | None:
    """Copy the first overlay of the workspace; None at a commit (overlays are not in git)."""
    if not new.workspace:
        return None
    files = sorted((new.repo / OVERLAYS).glob("*.png"))
    if not files:
        return None
    atomic.write_bytes(out_dir / "overlay.png", files[0].read_bytes())
    return files[0].name
