"""scripts/benchmark_speed.py on tiny components: a smoke test of the speed benchmark (not a timed test), and the
call counts it records, which pin the batching: one UNet call per step for all rows and both CFG branches."""

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))

import benchmark_speed  # noqa: E402

STEPS = 3


def test_speed_benchmark_reports_every_figure_against_its_floor(capsys):
    rows = benchmark_speed.main(["--arch", "tiny", "--resolution", "16", "--steps", str(STEPS), "--inner", "2",
                                 "--batches", "1", "2", "--methods", "NPI", "NPI+P2P replace", "EDICT", "NTI",
                                 "--in-process", "--reps", "1", "--device", "cpu"])
    table = capsys.readouterr().out
    assert "| method | batch | s / image |" in table and "x floor" in table
    by = {(r["method"], r["batch"]): r for r in rows}
    assert len(by) == 8
    for r in rows:
        assert r["seconds_per_image"] > 0 and r["floor_s_per_image"] > 0 and r["x_floor"] > 0
        assert r["peak_memory_mb"] > 0 and r["finite"]
        assert abs(r["seconds_per_image"] - r["x_floor"] * r["floor_s_per_image"]) < 1e-6
    for b in (1, 2):
        npi = by[("NPI", b)]
        # inversion: one call per step (B rows); sampling: one call per step for the reconstruction rows (one
        # branch: NPI's negative is its condition) and both branches of every edit row: 1 + 2 rows per image
        assert npi["unet_calls"] == 2 * STEPS and npi["unet_rows"] == STEPS * b * (1 + 3)
        assert by[("NPI+P2P replace", b)]["unet_calls"] == 2 * STEPS
        assert by[("EDICT", b)]["unet_calls"] == 2 * STEPS * 2  # two sequential calls per step, both ways
        assert by[("NTI", b)]["unet_calls"] > 2 * STEPS  # plus the inner iterations
