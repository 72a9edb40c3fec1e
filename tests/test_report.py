"""``hf-weightforces report`` on a real Trainer run: every figure it lists is written as a PNG and
linked from the summary; without checkpoints the spline figure is skipped with its reason, without
the trajectory-geometry probes the backbone and rank figures."""

from __future__ import annotations

import contextlib
import io
import json
import math
import re

import pytest

from hf_weightforces.analysis.figures_geometry import fig_ranks
from hf_weightforces.analysis.plotstyle import STYLES
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
    """50 steps with every row the callback can write: Weibull events, layers, both probes, checkpoints."""
    from conftest import train_tiny

    from hf_weightforces import BackboneProbe, RankProbe, WeightForcesCallback

    folder = tmp_path_factory.mktemp("run")
    probes = [BackboneProbe(every=10, snapshot_every=5), RankProbe(every=20)]
    train_tiny(folder, [WeightForcesCallback(weibull_every=20, probes=probes)], max_steps=50, logging_steps=5,
               save_strategy="steps", save_steps=10, save_only_model=True, learning_rate=3e-3, warmup_steps=5)
    return folder


@pytest.mark.slow
def test_report_writes_every_figure_it_lists(run, tmp_path):
    code, out, err = run_cli(["report", str(run), "--out", str(tmp_path / "report"), "--dpi", "60"])
    assert code == 0, err
    written = {p.name for p in (tmp_path / "report").glob("*.png")}
    assert set(FIGURES) <= written  # the command may add figures of its own (dynamics.png)
    for name in FIGURES:
        data = (tmp_path / "report" / name).read_bytes()
        assert data.startswith(PNG) and len(data) > 5000
        stem = tmp_path / "report" / name.replace(".png", "")
        assert stem.with_suffix(".pdf").read_bytes().startswith(b"%PDF")  # vector copies beside the PNG
        assert b"<svg" in stem.with_suffix(".svg").read_bytes()[:2000]
    summary = (tmp_path / "report" / "summary.md").read_text()
    assert sorted(re.findall(r"\]\((\w+\.png)\)", summary)) == sorted(FIGURES)  # write_report's own
    assert "Not drawn" not in summary and "| total | corrected |" in summary
    assert str(tmp_path / "report" / "summary.md") in out


@pytest.mark.slow
def test_report_without_checkpoints_says_what_it_left_out(run, tmp_path):
    """Also: backbone estimates every 10 steps, per-step |cos| at every row after the first, rank
    passes at the first row and every 20 steps; the geometry figures and tables take each from its rows."""
    report = write_report(run, out_dir=tmp_path, checkpoints=False, dpi=40)
    assert set(report.figures) == set(FIGURES) - {"spline.png"}
    assert "spline.png" in report.skipped
    assert "spline.png" not in {p.name for p in tmp_path.glob("*.png")}
    summary = (tmp_path / "summary.md").read_text()
    assert "`spline.png`" in summary
    assert "](backbone.png)" in summary and "](ranks.png)" in summary
    rows = [json.loads(line) for line in (run / "weightforces" / "metrics.jsonl").read_text().splitlines()]
    estimates = [r["step"] for r in rows if "weightforces/backbone/total/fraction" in r]
    cosines = [r["step"] for r in rows if "weightforces/backbone/total/update_cos" in r]
    ranks = [r["step"] for r in rows if "weightforces/rank/all/kq/stable_rank" in r]
    assert estimates == [10, 20, 30, 40, 50] and cosines == list(range(15, 55, 5)) and ranks == [5, 20, 40]
    table = summary.split("## Trajectory geometry: the backbone")[1].split("##")[0]
    total = next(line for line in table.splitlines() if line.startswith("| total | 50 |")).split(" | ")
    fraction, null = float(total[2]), float(total[3])
    assert 0 < null < fraction <= 1  # the last estimate, beside its null
    kq = next(line for line in summary.splitlines() if line.startswith("| kq | 5 |"))
    assert "| 40 |" in kq  # layer-mean ranks at the first and last pass


@pytest.mark.slow
def test_run_without_probes_skips_the_geometry_figures(tmp_path):
    from conftest import train_tiny

    from hf_weightforces import WeightForcesCallback

    train_tiny(tmp_path / "run", [WeightForcesCallback(per_layer=False, weibull_every=0)], max_steps=8,
               logging_steps=4)
    report = write_report(tmp_path / "run", out_dir=tmp_path / "report", dpi=40)
    assert {"backbone.png", "ranks.png"} <= set(report.skipped)
    assert "forces.png" in report.figures
    assert not (tmp_path / "report" / "backbone.png").exists() and not (tmp_path / "report" / "ranks.png").exists()
    summary = (tmp_path / "report" / "summary.md").read_text()
    assert "- `backbone.png`: no backbone keys in metrics.jsonl (train with BackboneProbe" in summary
    assert "- `ranks.png`: no rank keys in metrics.jsonl (train with RankProbe" in summary
    assert "Trajectory geometry" not in summary and "](ranks.png)" not in summary


def test_rank_figure_without_heads_and_with_many_layers(tmp_path):
    """Fused QKV without known heads: the per-layer panels fall back to the whole ``qkv`` matrix;
    more than eight layers get a colour bar instead of a legend."""
    rows = [{"step": step, **{f"weightforces/rank/layer_{n:02d}/qkv/{stat}": value
                              for n in range(12) for stat, value in (("stable_rank", 9.0 / step), ("top_share", 0.1))}}
            for step in (1, 2, 3)]
    from hf_weightforces.analysis.plotstyle import save

    caption = fig_ranks(rows, lambda fig: save(fig, tmp_path / "ranks.png", 40), STYLES["default"])
    assert "fused QKV" in caption and (tmp_path / "ranks.png").read_bytes().startswith(PNG)
    assert fig_ranks([{"step": 1, "weightforces/rank/all/kq/stable_rank": math.nan}], None, STYLES["default"]) is None


def test_report_needs_metrics(tmp_path):
    with pytest.raises(RecordError, match="metrics.jsonl"):
        write_report(tmp_path)
    code, _, err = run_cli(["report", str(tmp_path / "nowhere")])
    assert code == 2 and err.startswith("error:")


@pytest.mark.slow
def test_paper_style_is_one_column_wide_and_labels_every_axis(run, tmp_path):
    """``--style paper``: 3.5 inches wide at 300 dpi; every drawn panel names its x and y quantity."""
    from PIL import Image

    code, _, err = run_cli(["report", str(run), "--out", str(tmp_path), "--no-checkpoints", "--style", "paper",
                            "--formats", "png"])
    assert code == 0, err
    for name in ("forces.png", "weibull.png", "balance.png"):
        with Image.open(tmp_path / name) as im:
            assert abs(im.size[0] / 300 - 3.5) < 0.2, (name, im.size)
    assert not list(tmp_path.glob("*.pdf"))


def test_every_axis_is_labelled_and_legends_sit_outside(tmp_path):
    """Synthetic rows with forces spanning six decades: symlog axes, labels with units, one legend
    outside the panels; the balance figure leaves out a class without weight decay and says so."""
    from hf_weightforces.analysis.figures import fig_balance, fig_forces, fig_weibull
    from hf_weightforces.analysis.plotstyle import style

    rows = []
    for step in range(1, 21):
        row = {"step": step}
        for g, wd in (("transmission", 1.0), ("other", 0.0), ("total", 1.0)):
            row.update({f"weightforces/{g}/align": 1e-2 / step, f"weightforces/{g}/inject": 1e-4,
                        f"weightforces/{g}/decay": -1e-3 * wd, f"weightforces/{g}/rest": -1e-8 * wd})
        row.update({"weightforces/matrices/weibull_k": 1.2, "weightforces/matrices/weibull_scale": 0.02,
                    "weightforces/matrices/weibull_scale_over_rms": 0.89, "weightforces/matrices/rms": 0.0225})
        rows.append(row)
    figs = []

    def keep(fig):
        figs.append(fig)

    with style("default") as st:
        fig_forces(rows, ["transmission", "other", "total"], keep, st)
        caption = fig_balance(rows, ["transmission", "other", "total"], keep, st)
        fig_weibull(rows, None, keep, st)
    assert "left out: other" in caption
    for fig in figs:
        assert not any(ax.get_legend() for ax in fig.axes)  # legends are the figure's, below the panels
        assert fig.legends
        for ax in fig.axes:
            if ax.axison and ax.lines:
                assert ax.get_xlabel() and ax.get_ylabel(), (fig._suptitle.get_text(), ax.get_title())
    scales = {ax.get_title(): ax.get_yscale() for ax in figs[0].axes if ax.axison}
    assert scales == {"transmission": "symlog", "other": "linear", "total": "symlog"}  # R at 1e-8 beside A at 1e-3
    balance_labels = [t.get_text() for t in figs[1].legends[0].get_texts()]
    assert "other" not in balance_labels and "transmission" in balance_labels
