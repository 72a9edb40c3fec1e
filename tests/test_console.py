"""The console sink: a line per log event when no tracker shows the keys, a table at train end, quiet when asked."""

from __future__ import annotations

import io
import logging
import math

import pytest
from conftest import train_tiny

from hf_weightforces import WeightForcesCallback
from hf_weightforces.integrations.console import CONSOLE_LOGGER, ConsoleSink, console_logger, tracker_shows_keys


def _row(align, inject, decay, delta, steps, **extra):
    row = {"weightforces/steps": steps}
    for key, value in dict(align=align, inject=inject, decay=decay, delta=delta, **extra).items():
        row[f"weightforces/total/{key}"] = value
    return row


def test_run_shares_are_sums_first_over_the_rows():
    """Row values are means per budget step: the run's sums multiply each back by its steps."""
    messages: list[str] = []
    sink = ConsoleSink(lines=False, logger=logging.getLogger("test_console_table"))
    sink.logger.info = messages.append  # type: ignore[method-assign]
    rows = [_row(3.0, 1.0, -2.0, 2.0, 4, closure_rel=1e-7, rms=0.5),
            _row(-1.0, 0.5, -1.5, -2.0, 2, closure_rel=-3e-7, rms=0.25, weibull_k=1.5),
            _row(math.nan, math.nan, math.nan, math.nan, 3, closure_rel=math.nan)]  # non-finite interval: left out
    for step, row in zip((4, 6, 9), rows):
        sink.log(row, step)
    (total,) = sink.totals.values()
    a, i, d = 3.0 * 4 - 1.0 * 2, 1.0 * 4 + 0.5 * 2, -2.0 * 4 - 1.5 * 2
    assert total.steps == 6
    for force, value in zip(("align", "inject", "decay"), (a, i, d)):
        assert total.share(force) == pytest.approx(abs(value) / (abs(a) + abs(i) + abs(d)), rel=1e-15)
    assert total.sums["delta"] == pytest.approx(2.0 * 4 - 2.0 * 2)
    assert (total.closure, total.rms, total.k) == (3e-7, 0.25, 1.5)
    assert messages == []
    sink.close()
    (table,) = messages
    assert "through step 9 (3 rows, 6 budget steps" in table
    line = table.splitlines()[-1].split()
    assert line[0] == "total" and line[1:4] == [f"{100 * abs(v) / (abs(a) + abs(i) + abs(d)):.1f}%" for v in (a, i, d)]
    assert line[4:] == ["6.67e-01", "3.00e-07", "0.25", "1.500"]


@pytest.mark.parametrize(
    "trackers, to_all, ordered, shown",
    [([], False, True, False), (["a W&B or TensorBoard sink"], False, True, True), ([], True, True, True),
     (["a sink"], True, False, False)],
)
def test_tracker_shows_keys(trackers, to_all, ordered, shown):
    assert tracker_shows_keys(trackers, to_all, ordered) is shown


def test_plain_script_gets_a_handler():
    """No logging configured anywhere: the sink's logger prints to stderr by itself (once)."""
    root, log = logging.getLogger(), logging.getLogger(CONSOLE_LOGGER)
    saved = (root.handlers[:], log.handlers[:], log.level, log.propagate)
    root.handlers.clear()
    log.handlers.clear()
    log.setLevel(logging.NOTSET)
    try:
        assert console_logger() is console_logger() and len(log.handlers) == 1 and not log.propagate
        stream = io.StringIO()
        log.handlers[0].setStream(stream)
        ConsoleSink(lines=True).log(_row(1.0, 1.0, -2.0, 0.0, 1, align_share=0.25), 7)
        assert stream.getvalue().startswith("[hf-weightforces] weight forces step 7 (1 budget step): total align 25.0%")
    finally:
        root.handlers[:], log.handlers[:] = saved[0], saved[1]
        log.setLevel(saved[2])
        log.propagate = saved[3]


def _console(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == CONSOLE_LOGGER]


@pytest.mark.slow
def test_report_to_none_speaks_and_quiet_does_not(tmp_path, wf_rows, caplog):
    caplog.set_level(logging.INFO, logger=CONSOLE_LOGGER)
    train_tiny(tmp_path / "plain", [WeightForcesCallback(weibull_every=4)], max_steps=8, logging_steps=4)
    rows = wf_rows(tmp_path / "plain")
    lines = _console(caplog)
    assert len(lines) == 3, lines  # two log events, then the table
    for line, row in zip(lines, rows):
        assert line.startswith(f"weight forces step {row['step']} (4 budget steps): total align "
                               f"{100 * row['weightforces/total/align_share']:.1f}%")
        assert f"closure {row['weightforces/total/closure_rel']:.2e} of |A|+|I|+|D|" in line
        assert f"weibull k {row['weightforces/matrices/weibull_k']:.3f}" in line
    table = lines[2].splitlines()
    assert table[0].startswith("weight forces through step 8 (2 rows, 8 budget steps")
    assert [t.split()[0] for t in table[2:]] == ["transmission", "selection", "embedding", "other",
                                                 "matrices", "total"]

    caplog.clear()
    train_tiny(tmp_path / "quiet", [WeightForcesCallback(quiet=True)], max_steps=4, logging_steps=2)
    assert _console(caplog) == [] and len(wf_rows(tmp_path / "quiet")) == 2

    # the keys in the Trainer's logs (the console printer shows them): the table only
    train_tiny(tmp_path / "all", [WeightForcesCallback(to_all_integrations=True)], max_steps=4, logging_steps=2)
    (table,) = _console(caplog)
    assert table.startswith("weight forces through step 4 (2 rows")
