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
    assert "tta" not in card and "postprocess" not in card
    # the first ingredient's run figures (its selected epoch, history, times) do not describe the average
    assert not set(card["training"]) & {"history", "selected_epoch", "selected_seconds", "epochs_run", "train_seconds",
                                        "total_seconds", "stopped_early"}
    assert card["training"]["config"] == selected.card["training"]["config"]  # what finds the validation cases
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

    other = tmp_path / "other-taef2"
    shutil.copytree(resolve_model_path("busi-lesion"), other)
    card = json.loads((other / "card.json").read_text())
    card["foundation"]["files"] = {k: "0" * 64 for k in card["foundation"]["files"]}
    (other / "card.json").write_text(json.dumps(card))
    p = run_gms("average", "busi-lesion", other, "-o", out)
    assert p.returncode == 2 and "different foundation model weights" in p.stderr, p.stderr
    assert not out.exists()

    p = run_gms("average", "busi-lesion", "-o", out)
    assert p.returncode == 2 and "at least two" in p.stderr and not out.exists()

    out.mkdir()
    (out / "keep.txt").write_text("mine")
    p = run_gms("average", "busi-lesion", "busi-lesion", "-o", out)
    assert p.returncode == 2 and "exists" in p.stderr and (out / "keep.txt").read_text() == "mine"
    assert sorted(x.name for x in out.iterdir()) == ["keep.txt"]

    state = torch.load(tiny_model.with_name(tiny_model.name + ".work") / "last.pt", weights_only=True)
    assert state["output"] == str(tiny_model.resolve())
    state["output"] = str(tmp_path / "gone")  # the run's model folder was deleted
    orphan = tmp_path / "gone.work"
    orphan.mkdir()
    torch.save(state, orphan / "last.pt")
    p = run_gms("average", tiny_model, orphan, "-o", tmp_path / "o2")
    assert p.returncode == 2 and "run's model folder" in p.stderr and "gone" in p.stderr, p.stderr
    assert not (tmp_path / "o2").exists()


def test_train_keeps_snapshots_to_average(busi_dir, tmp_path):
    """gms train --keep-every 1 keeps each epoch's moving average in the work folder (here a custom --work-dir), and
    gms average finds their run's card and statistics from the snapshots alone."""
    out, work = tmp_path / "run", tmp_path / "elsewhere"
    run_gms("--threads", "2", "train", busi_dir, "-o", out, "--work-dir", work, "--segments", "lesion",
            "--max-train", "8", "--max-val", "2", "--augment-copies", "1", "--warmup-epochs", "1",
            "--dice-samples", "1", "--ema", "0.9", "--epochs", "2", "--keep-every", "1", "--no-postprocess-select",
            check=True)
    snaps = sorted(work.glob("epoch-*.pt"))
    assert [s.name for s in snaps] == ["epoch-0001.pt", "epoch-0002.pt"]
    last = torch.load(work / "last.pt", weights_only=True)
    s2 = torch.load(snaps[1], weights_only=True)
    assert s2["epoch"] == 2 and "opt" not in s2 and "lmm" not in s2  # the averaged weights only
    assert all(torch.equal(s2["ema"][k], v) for k, v in last["ema"].items())
    avg = tmp_path / "avg"
    run_gms("average", *snaps, "-o", avg, check=True)
    card = json.loads((avg / "card.json").read_text())
    assert [s["epoch"] for s in card["training"]["averaged_from"]] == [1, 2]
    s1 = torch.load(snaps[0], weights_only=True)
    a = GMSModel.load(avg).lmm.state_dict()
    for k, v in a.items():
        torch.testing.assert_close(v.float(), (s1["ema"][k].float() + s2["ema"][k].float()) / 2, atol=2e-3,
                                   rtol=1e-3)
    p = run_gms("--threads", "2", "train", busi_dir, "-o", tmp_path / "bad", "--segments", "lesion",
                "--keep-every", "-1")
    assert p.returncode == 2 and "--keep-every must be" in p.stderr and not (tmp_path / "bad").exists()


class _RunsCode:
    """Pickled, it calls open(marker, "w") when loaded: a checkpoint that would run code."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_average_refuses_a_code_running_or_damaged_checkpoint_in_one_line(tmp_path):
    import pickle

    marker = tmp_path / "ran.txt"
    evil = tmp_path / "evil.pt"
    evil.write_bytes(pickle.dumps({"ema": _RunsCode(marker)}))
    damaged = tmp_path / "damaged.pt"
    torch.save({"ema": {"w": torch.zeros(64)}}, damaged)
    damaged.write_bytes(damaged.read_bytes()[:200])
    for checkpoint, reason in ((evil, "refused to load training checkpoint"),
                               (damaged, "cannot load training checkpoint")):
        out = tmp_path / f"avg-{checkpoint.stem}"
        p = run_gms("average", "busi-lesion", checkpoint, "-o", out)
        lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
        assert p.returncode == 2 and len(lines) == 1 and lines[0].startswith(f"gms: error: {reason} "), p.stderr
        assert not out.exists() and not marker.exists()
