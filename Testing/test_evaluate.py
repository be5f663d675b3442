"""``gms evaluate`` on real cases: a table on stdout and a per-case CSV."""
import csv

from conftest import run_gms


def test_evaluate_2d_writes_table_and_csv(tiny_model, busi_dir, tmp_path):
    out = tmp_path / "m.csv"
    p = run_gms("evaluate", busi_dir, "--model", tiny_model, "--cases", "benign_3", "malignant_3", "normal_7",
                "--csv", out, "--resolution", "model", check=True)
    assert "DSC" in p.stdout and "lesion" in p.stdout
    rows = list(csv.DictReader(open(out)))
    assert [r["case"] for r in rows] == ["benign_3", "malignant_3", "normal_7"]
    for r in rows:
        assert 0.0 <= float(r["dice"]) <= 1.0 and 0.0 <= float(r["iou"]) <= float(r["dice"]) + 1e-9
    assert rows[2]["gt_empty"] == "1"  # normal images have empty masks


def test_evaluate_3d_per_label(tiny_model, hippo_dir, tmp_path):
    out = tmp_path / "h.csv"
    run_gms("evaluate", hippo_dir, "--model", tiny_model, "--cases", "hippocampus_025", "--csv", out, check=True)
    rows = list(csv.DictReader(open(out)))
    assert len(rows) == 1 and rows[0]["label"] == "1"
