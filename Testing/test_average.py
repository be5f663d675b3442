"""``gms average``: weight averaging of models of one training lineage (a run's model folder, its checkpoint, runs
continued from it), through the command line as users and the worker run it."""
import json
import re
import shutil

import torch

from conftest import run_gms
from GMSSegmentLib.model import GMSModel
from GMSSegmentLib.modelpaths import resolve_model_path


def test_average_of_a_run_and_its_checkpoint(tiny_model, busi_dir, tmp_path):
    """The tiny run's selected model and its last checkpoint: the new folder holds their mean (the checkpoint's
    weights, not the model folder's), the run's latent statistics, a card that names both ingredients and drops the
    inference options and metrics that belonged to the first; weights 1 0 give back the first ingredient; and the
    averaged model segments real BUSI images through ``gms evaluate``."""
    work = tiny_model.with_name(tiny_model.name + ".work")
    state = torch.load(work / "last.pt", weights_only=True)
    ckpt = state.get("ema", state["lmm"])
    selected = GMSModel.load(tiny_model)
    out = tmp_path / "avg"
    p = run_gms("average", tiny_model, work, "-o", out, "--name", "busi-tiny-avg", check=True)
    assert "gms postprocess" in p.stdout
    avg = GMSModel.load(out)
    sel_sd, avg_sd = selected.lmm.state_dict(), avg.lmm.state_dict()
    assert set(avg_sd) == set(ckpt) == set(sel_sd)
    moved = 0
    for k, v in avg_sd.items():
        want = (sel_sd[k].float() + ckpt[k].float()) / 2
        torch.testing.assert_close(v.float(), want, atol=2e-3, rtol=1e-3)  # stored in fp16
        moved += not torch.allclose(v.float(), sel_sd[k].float(), atol=1e-3)
    assert moved > 0, "the checkpoint's weights should have entered the average"
    for k in ("image_mean", "image_std", "mask_mean", "mask_std"):
        assert torch.equal(getattr(avg, k), getattr(selected, k))
    card = json.loads((out / "card.json").read_text())
    assert card["name"] == "busi-tiny-avg" and card["metrics"] == {}
    assert "tta" not in card and "postprocess" not in card and "history" not in card["training"]
    src = card["training"]["averaged_from"]
    assert [s["kind"] for s in src] == ["model", "checkpoint"] and [s["weight"] for s in src] == [0.5, 0.5]
    assert src[1]["epoch"] == state["epoch"] == 4 and src[0]["selected_epoch"] == selected.card["training"][
        "selected_epoch"]

    first = tmp_path / "first"
    run_gms("average", tiny_model, work / "last.pt", "-o", first, "--weights", "1", "0", check=True)
    for k, v in GMSModel.load(first).lmm.state_dict().items():
        assert torch.equal(v, sel_sd[k]), k

    p = run_gms("--threads", "2", "evaluate", busi_dir, "--model", out, "--list", "test", "--limit", "3",
                "--no-tta", "--progress", "none", check=True)
    assert re.search(r"^lesion\s+3\s", p.stdout, re.M), p.stdout


def test_average_refuses_what_cannot_be_averaged(tiny_model, tmp_path):
    """Different segments, different latent statistics, a single source, an existing output and a checkpoint whose
    run folder is gone: each is refused with its reason, and nothing is written."""
    out = tmp_path / "out"
    p = run_gms("average", "busi-lesion", "kvasir-polyp", "-o", out)
    assert p.returncode == 2 and "'segments' differ" in p.stderr, p.stderr
    assert not out.exists()

    shifted = GMSModel.load(resolve_model_path("busi-lesion"))
    shifted.image_mean += 0.01
    shifted.save(tmp_path / "shifted")
    p = run_gms("average", "busi-lesion", tmp_path / "shifted", "-o", out)
    assert p.returncode == 2 and "latent statistics (image_mean) differ" in p.stderr, p.stderr
    assert not out.exists()

    p = run_gms("average", "busi-lesion", "-o", out)
    assert p.returncode == 2 and "at least two" in p.stderr and not out.exists()

    out.mkdir()
    (out / "keep.txt").write_text("mine")
    p = run_gms("average", "busi-lesion", "busi-lesion", "-o", out)
    assert p.returncode == 2 and "exists" in p.stderr and (out / "keep.txt").read_text() == "mine"
    assert sorted(x.name for x in out.iterdir()) == ["keep.txt"]

    orphan = tmp_path / "gone.work"
    orphan.mkdir()
    shutil.copy(tiny_model.with_name(tiny_model.name + ".work") / "last.pt", orphan / "last.pt")
    p = run_gms("average", tiny_model, orphan, "-o", tmp_path / "o2")
    assert p.returncode == 2 and "run's model folder" in p.stderr, p.stderr
    assert not (tmp_path / "o2").exists()
