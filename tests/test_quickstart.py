"""The main job: `datm-fast quickstart` end to end on the bundled digits, seeded, with its table asserted."""

from __future__ import annotations

import json

import pytest

from datm_fast.cli import main
from datm_fast.quickstart import QuickstartConfig, run_quickstart

pytest.importorskip("sklearn", reason="the quickstart's default dataset is scikit-learn's bundled digits")


@pytest.mark.slow
def test_quickstart_distilled_sets_beat_random_real(tmp_path, capsys):
    rows = run_quickstart(QuickstartConfig(out=str(tmp_path / "qs")), progress=False)
    table = capsys.readouterr().out
    assert [r.ipc for r in rows] == [1, 10]
    by_ipc = {r.ipc: r for r in rows}
    # IPC 1: one learned image per class with learned soft labels clearly beats one real image per class.
    assert by_ipc[1].distilled.mean > by_ipc[1].baseline.mean + 0.05, table
    # IPC 10: ten real images per class already reach about 89% on digits, close to the experts' own
    # 91.6%, so there is little room above them: the distilled set measured 92.2 % before the conv op
    # change and 90.4 +- 1.8 % after it (seed 0, 2 evaluation runs; rounding-level changes move it by
    # about 2 points). On 2026-12-04 the experts' blocks moved from PyTorch's ops to the fused C++
    # kernels for these digits (their 3x3 last map is odd, which only the old torch.compile block could
    # not take): IPC 1 82.4 +- 2.5 -> 79.9 +- 1.6 %, IPC 10 91.7 +- 1.3 -> 90.4 +- 1.8 %, random real
    # 64.2 / 88.8 % both (same machine, side by side); ExpertTrainer(backend="torch") gives the old
    # experts bit for bit. What holds robustly: it is not worse than random real by more than the
    # evaluation noise, and ten learned images per class clearly beat one.
    assert by_ipc[10].distilled.mean > by_ipc[10].baseline.mean - 0.015, table
    assert by_ipc[10].distilled.mean > by_ipc[1].distilled.mean + 0.04, table
    for r in rows:
        assert f"IPC {r.ipc}" in table and f"{100 * r.distilled.mean:.1f}" in table
        assert r.grid.exists() and r.report.exists()
        report = r.report.read_text()
        assert "curves.png" in report
        results = json.loads((r.run_dir / "eval_best_vs_random_real.json").read_text())
        assert len(results["results"]) == 2
        assert (r.run_dir / "images_best.pt").exists() and (r.run_dir / "metrics.jsonl").exists()


def test_quickstart_command_line_is_wired(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["quickstart", "--help"])
    assert exc.value.code == 0
    assert "--ipcs" in capsys.readouterr().out
