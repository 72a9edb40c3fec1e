"""``hf-weightforces report`` on a real Trainer run: every figure it lists is written as a PNG and
linked from the summary; without checkpoints the spline figure is skipped with its reason."""

from __future__ import annotations

import contextlib
import io
import re

import pytest

from hf_weightforces.analysis.records import RecordError
from hf_weightforces.analysis.report import FIGURES, write_report
from hf_weightforces.cli import main

pytest.importorskip("matplotlib")
PNG = b"\x89PNG\r\n\x1a\n"


def run_cli(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from conftest import train_tiny

    from hf_weightforces import WeightForcesCallback

    folder = tmp_path_factory.mktemp("run")
    train_tiny(folder, [WeightForcesCallback(weibull_every=20)], max_steps=50, logging_steps=5,
               save_strategy="steps", save_steps=10, save_only_model=True, learning_rate=3e-3, warmup_steps=5)
    return folder


@pytest.mark.slow
def test_report_writes_every_figure_it_lists(run, tmp_path):
    code, out, err = run_cli(["report", str(run), "--out", str(tmp_path / "report"), "--dpi", "60"])
    assert code == 0, err
    written = sorted(p.name for p in (tmp_path / "report").glob("*.png"))
    assert written == sorted(FIGURES)
    for name in FIGURES:
        data = (tmp_path / "report" / name).read_bytes()
        assert data.startswith(PNG) and len(data) > 5000
    summary = (tmp_path / "report" / "summary.md").read_text()
    assert sorted(re.findall(r"\]\((\w+\.png)\)", summary)) == sorted(FIGURES)
    assert "Not drawn" not in summary and "| total | corrected |" in summary
    assert str(tmp_path / "report" / "summary.md") in out


@pytest.mark.slow
def test_report_without_checkpoints_says_what_it_left_out(run, tmp_path):
    report = write_report(run, out_dir=tmp_path, checkpoints=False, dpi=50)
    assert set(report.figures) == set(FIGURES) - {"spline.png"}
    assert "spline.png" in report.skipped
    assert "spline.png" not in {p.name for p in tmp_path.glob("*.png")}
    assert "`spline.png`" in (tmp_path / "summary.md").read_text()


def test_report_needs_metrics(tmp_path):
    with pytest.raises(RecordError, match="metrics.jsonl"):
        write_report(tmp_path)
    code, _, err = run_cli(["report", str(tmp_path / "nowhere")])
    assert code == 2 and err.startswith("error:")
