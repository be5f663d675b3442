"""Training on real BUSI images through the command line: the loss decreases, selection is on a validation part
carved from the training list, and the model folder has a complete card."""
import json

import numpy as np
import pytest
import torch

from GMSSegmentLib import GMSError
from GMSSegmentLib.model import GMSModel
from GMSSegmentLib.data import SPLIT_SETTINGS, split_names
from GMSSegmentLib.train import TrainConfig, code_image, soft_probs


def test_short_training_loss_decreases(tiny_model, tiny_model_card):
    hist = tiny_model_card["training"]["history"]
    losses = [h["loss"] for h in hist]
    assert len(losses) == 4
    assert losses[-1] < losses[0] * 0.9, losses
    assert all("val_dice" in h for h in hist)


def test_card_is_complete(tiny_model_card, busi_dir):
    c = tiny_model_card
    assert c["foundation"]["name"] == "taef2"
    assert set(c["foundation"]["files"]) == {"taef2_encoder.pth", "taef2_decoder.pth"}
    assert c["input_size"] == 224 and c["normalization"] == {"mode": "photo"}
    assert c["segments"][0]["name"] == "lesion" and c["segments"][0]["label"] == 1
    assert len(c["segments"][0]["color"]) == 3
    assert c["trainable_parameters"] == 1_637_552  # the paper's LMM with 32 latent channels
    assert "validation" in c["metrics"] and 0.0 <= c["metrics"]["validation"]["dice"] <= 1.0
    assert c["training"]["train_cases"] == 24 and c["training"]["validation_cases"] == 6
    assert c["training"]["config"]["dice_samples"] == 1
    from GMSSegmentLib.pipeline import training_precision
    assert c["training"]["precision"] == training_precision(torch.device("cpu"), "auto")  # what actually ran
    # flip TTA and post-processing chosen together at the end of training on the 6 validation cases, never on test
    pp, tta = c["postprocess"], c["tta"]
    assert pp["selected_on"] == tta["selected_on"] == "6 validation cases"
    assert isinstance(pp["largest_component"], bool) and tta["views"] in (1, 2, 4)
    assert tta["scales"] in ([224], [224, 256], [224, 256, 288])
    table = pp["validation_dice"]
    assert set(table) == {f"{v}_views{sc}/{p}" for v in (1, 2, 4) for sc in ("", "_224+256", "_224+256+288")
                          for p in ("none", "largest_component")}
    sc = "" if tta["scales"] == [224] else "_" + "+".join(map(str, tta["scales"]))
    chosen = f"{tta['views']}_views{sc}/{'largest_component' if pp['largest_component'] else 'none'}"
    assert table[chosen] == max(table.values())
    assert pp["command"].startswith("gms postprocess ") and "--model " in pp["command"]  # how to redo the choice
    assert c["training"]["epochs_run"] == len(c["training"]["history"]) >= c["training"]["selected_epoch"] >= 1
    lc = c["training"]["latent_cache"]
    assert lc["entries"] == 24 + 6 and lc["seconds"] > 0 and lc["reused"] is False
    assert lc["precision"] == c["training"]["precision"]  # training latents encoded in the training precision
    assert c["training"]["compiled"] is False


def _split_names(cfg: TrainConfig, root):
    """The training and validation cases gms train uses for ``cfg``."""
    return split_names(root, **{k: getattr(cfg, k) for k in SPLIT_SETTINGS})


def test_split_defaults_are_the_training_defaults():
    """A card whose config lacks a split setting gets gms train's default for it (data.split_names' defaults)."""
    import inspect
    from dataclasses import fields

    params = inspect.signature(split_names).parameters
    defaults = {f.name: f.default for f in fields(TrainConfig)}
    assert {k: params[k].default for k in SPLIT_SETTINGS} == {k: defaults[k] for k in SPLIT_SETTINGS}


def test_validation_is_carved_from_train_never_test(busi_dir):
    cfg = TrainConfig(data=str(busi_dir), output="unused")
    train, val = _split_names(cfg, busi_dir)
    split = json.loads((busi_dir / "split.json").read_text())
    assert len(train) + len(val) == len(split["train"]) and len(val) == 52
    assert not (set(train) | set(val)) & set(split["test"])
    assert not set(train) & set(val)


def test_adapting_with_another_seed_keeps_the_models_validation_part(busi_dir):
    """--init-from a model on its own data set with another --seed (fresh augmented copies): the validation part stays
    the one the model was selected on, so none of its training cases are scored as validation; the new card's config
    leads gms postprocess / evaluate back to the same cases. An explicit --split-seed, or another data set, is kept."""
    from dataclasses import asdict, replace

    from GMSSegmentLib.evaluate import validation_cases
    from GMSSegmentLib.modelpaths import resolve_model_path
    from GMSSegmentLib.train import _keep_base_validation

    base = json.loads((resolve_model_path("busi-lesion") / "card.json").read_text())
    base_val = validation_cases(base, busi_dir)
    assert len(base_val) == 52
    cfg = TrainConfig(data=str(busi_dir), output="unused", seed=1, init_from="busi-lesion")
    _, naive_val = _split_names(cfg, busi_dir)
    assert set(naive_val) != set(base_val)  # a plain carve with seed 1 would mix the model's training cases in
    adapted, note = _keep_base_validation(cfg, base, busi_dir)
    assert adapted.seed == 1 and adapted.split_seed == base["training"]["config"]["seed"]
    assert "selected on" in note
    train, val = _split_names(adapted, busi_dir)
    assert val == base_val and not set(train) & set(base_val)
    card = {"training": {"data": busi_dir.name, "config": asdict(adapted)}}
    assert validation_cases(card, busi_dir) == base_val

    explicit = replace(cfg, split_seed=1)
    assert _keep_base_validation(explicit, base, busi_dir) == (explicit, None)
    other = {**base, "training": {**base["training"], "data": "kvasir-seg"}}
    assert _keep_base_validation(cfg, other, busi_dir) == (cfg, None)


def test_resume_continues_from_checkpoint(tiny_model, tmp_path):
    from conftest import run_gms, SHARED

    work = tiny_model.with_name(tiny_model.name + ".work")
    assert (work / "last.pt").is_file() and (work / "train.log").is_file()
    state = torch.load(work / "last.pt", weights_only=True)
    assert state["epoch"] == 4


def test_ema_weights_are_validated_saved_and_resumed(busi_dir, tmp_path):
    """--ema: the model folder holds the moving average (not the last step's weights), the checkpoint keeps both, and a
    resumed run continues the average from the checkpoint."""
    from conftest import run_gms

    out = tmp_path / "ema"
    args = ["--threads", "2", "train", busi_dir, "-o", out, "--segments", "lesion", "--max-train", "8", "--max-val", "2",
            "--augment-copies", "1", "--warmup-epochs", "1", "--dice-samples", "1", "--ema", "0.9",
            "--no-postprocess-select"]
    run_gms(*args, "--epochs", "1", check=True)
    work = tmp_path / "ema.work"
    state = torch.load(work / "last.pt", weights_only=True)
    saved = GMSModel.load(out).lmm.state_dict()
    assert set(state["ema"]) == set(state["lmm"]) == set(saved)
    # one validation, at epoch 1: the saved model is the average at that point, stored in fp16
    for k, v in state["ema"].items():
        torch.testing.assert_close(saved[k].float(), v.float(), atol=2e-3, rtol=1e-3)
    moved = [k for k in state["lmm"] if not torch.allclose(state["lmm"][k], state["ema"][k], atol=1e-6)]
    assert len(moved) > len(state["lmm"]) // 2, "the average should lag behind the trained weights"
    card = json.loads((out / "card.json").read_text())
    assert card["training"]["config"]["ema"] == 0.9
    run_gms(*args, "--epochs", "2", check=True)
    state2 = torch.load(work / "last.pt", weights_only=True)
    assert state2["epoch"] == 2 and "resumed from" in (work / "train.log").read_text()
    assert any(not torch.equal(state2["ema"][k], state["ema"][k]) for k in state["ema"])
    # a decay outside [0, 1) is refused before any data is read, encoded or written
    bad = tmp_path / "bad"
    p = run_gms(*[bad if a == out else a for a in args], "--epochs", "1", "--ema", "1.5")
    assert p.returncode == 2 and "--ema must be" in p.stderr, p.stderr[-2000:]
    assert not bad.exists() and not (tmp_path / "bad.work").exists()


def test_multiclass_codes_and_probabilities():
    codes = np.array([[1, 1, 0], [0, 1, 1]], np.float32)
    lab = np.array([[0, 1], [2, 0]], np.uint8)
    img = code_image(lab, codes)
    assert img.shape == (2, 2, 3) and img[0, 1].tolist() == [1, 1, 0] and img[1, 0].tolist() == [0, 1, 1]
    p = soft_probs(torch.from_numpy(img).permute(2, 0, 1)[None], torch.from_numpy(codes))
    assert p.shape == (1, 2, 2, 2)
    assert p[0, 0, 0, 1] > 0.99 and p[0, 1, 1, 0] > 0.99 and p[0, :, 0, 0].max() < 0.01


def test_compile_failure_falls_back_to_eager_training(busi_dir, tmp_path, monkeypatch, capsys):
    """Where torch.compile cannot work (no C++ compiler, e.g. a plain Windows Slicer install) --compile still trains,
    eagerly, and the card says so. (A real compilation takes minutes here; the full models were trained with it.)"""
    from conftest import SHARED
    from GMSSegmentLib.train import train

    def broken_compile(module, **kw):
        def call(*a, **k):
            raise RuntimeError("Compiler: cl is not found")
        return call

    monkeypatch.setattr(torch, "compile", broken_compile)
    out = train(TrainConfig(data=str(busi_dir), output=str(tmp_path / "m"), max_train=8, max_val=2, augment_copies=1,
                            epochs=1, warmup_epochs=1, batch_size=4, dice_samples=1, compile=True,
                            select_postprocess=False, weights_dir=str(SHARED / "models")))
    card = json.loads((out / "card.json").read_text())
    assert card["training"]["compiled"] is False and card["training"]["epochs_run"] == 1
    assert card["training"]["selected_epoch"] == card["metrics"]["validation"]["epoch"] == 1
    assert card["training"]["train_seconds"] >= card["training"]["selected_seconds"] > 0
    assert "torch.compile failed (RuntimeError: Compiler: cl is not found); training eagerly" in capsys.readouterr().out


def test_init_from_adapts_a_bundled_model_and_keeps_its_starting_point(busi_dir, tmp_path):
    """--init-from: training starts from the model's LMM weights and latent statistics (not recomputed from the new
    data), takes its input size and normalisation, validates the starting point first and keeps it unless training
    beats it; the card names the model it started from. A mismatching foundation model, or writing over the model
    itself, is refused before anything is read or written."""
    import hashlib
    import shutil

    from conftest import MODULE_DIR, run_gms
    from GMSSegmentLib.modelpaths import resolve_model_path

    base_dir = resolve_model_path("busi-lesion")
    base = GMSModel.load(base_dir)
    out = tmp_path / "adapted"
    args = ["--threads", "2", "train", busi_dir, "-o", out, "--segments", "lesion", "--init-from", "busi-lesion",
            "--max-train", "8", "--max-val", "4", "--augment-copies", "1", "--warmup-epochs", "1",
            "--dice-samples", "1", "--no-postprocess-select"]
    p = run_gms(*args, "--epochs", "1", "--lr", "0", check=True)
    assert "the starting point, busi-lesion" in p.stdout
    card = json.loads((out / "card.json").read_text())
    hist = card["training"]["history"]
    assert hist[0]["epoch"] == 0 and hist[0]["saved"] and hist[0]["val_dice"] > 0.4  # a trained model, not noise
    assert hist[1]["epoch"] == 1 and hist[1]["val_dice"] == hist[0]["val_dice"]  # lr 0: the same weights
    assert card["metrics"]["validation"]["epoch"] == 0
    assert card["input_size"] == base.input_size and card["normalization"] == base.card["normalization"]
    ref = card["training"]["init_from"]
    assert ref["name"] == "busi-lesion"
    assert ref["weights_sha256"] == hashlib.sha256((base_dir / "model.safetensors").read_bytes()).hexdigest()
    adapted = GMSModel.load(out)
    for k, v in base.lmm.state_dict().items():
        assert torch.equal(adapted.lmm.state_dict()[k], v), k
    for k in ("image_mean", "image_std", "mask_mean", "mask_std"):
        assert torch.equal(getattr(adapted, k), getattr(base, k)), k

    # refused before any data is read or anything written
    before = (base_dir / "card.json").read_bytes()
    p = run_gms(*[base_dir if a == out else a for a in args], "--epochs", "1")
    assert p.returncode == 2 and "is the --init-from model itself" in p.stderr, p.stderr[-2000:]
    assert (base_dir / "card.json").read_bytes() == before
    other = tmp_path / "other-foundation"
    shutil.copytree(base_dir, other)
    c = json.loads((other / "card.json").read_text())
    c["foundation"] = {"name": "diffusers-kl", "path": "stabilityai/sd-vae-ft-mse"}
    (other / "card.json").write_text(json.dumps(c))
    bad = tmp_path / "bad"
    p = run_gms(*[bad if a == out else other if a == "busi-lesion" else a for a in args], "--epochs", "1")
    assert p.returncode == 2 and "trained on the foundation model 'diffusers-kl'" in p.stderr, p.stderr[-2000:]
    assert not bad.exists() and not (tmp_path / "bad.work").exists()
    assert MODULE_DIR in base_dir.parents  # the bundled model, untouched above


def test_training_sees_the_pixels_inference_sees(shared_dir):
    """Training's samples must be the pixels the network gets in use. Kvasir's JPEGs decode differently in PIL and
    ITK (up to ~50 grey levels apart); inference reads files with SimpleITK (``read_image``), so training
    must too. The array inference hands the network is captured at ``decode_slices`` on the real path of
    ``gms segment`` / ``gms evaluate`` with the shipped kvasir-polyp model."""
    from PIL import Image

    from GMSSegmentLib.data import find_image, load_2d
    from GMSSegmentLib.imageio import read_image
    from GMSSegmentLib.model import load_model, resolve_model_path
    from GMSSegmentLib.pipeline import FastDecodeSettings, SliceSegmenter, segment_array

    root = shared_dir / "data" / "kvasir-seg"
    m = load_model(resolve_model_path("kvasir-polyp"), weights_dir=shared_dir / "models", device=torch.device("cpu"))
    seg = SliceSegmenter(m, torch.device("cpu"), FastDecodeSettings(enabled=True), tta=1)
    seen = []
    real = seg.decode_slices
    seg.decode_slices = lambda x, *a, **k: (seen.append(np.array(x)), real(x, *a, **k))[1]
    names = json.loads((root / "split.json").read_text())["val"][:3]
    for name in names:
        seen.clear()
        path = find_image(root, name)
        assert path.suffix == ".jpg"
        segment_array(m, read_image(path).array, segmenter=seg)
        sample = load_2d(root, name, m.card["training"]["label_values"], m.card["normalization"])
        assert len(seen) == 1 and seen[0].shape == (1,) + sample.image.shape
        assert np.array_equal(seen[0][0], sample.image), name
        # the check has teeth: PIL's decoding of the same file is not what the network sees
        pil = np.asarray(Image.open(path).convert("RGB"), np.float32) / 255.0
        assert np.abs(pil - sample.image).max() > 5 / 255, name


def test_train_weight_decay_shrinks_weights(busi_dir, tmp_path):
    """--weight-decay reaches AdamW: the same tiny run (same seed, data and steps) with a large decay ends with
    smaller weights, and the card records the value; a negative value is refused before anything is written."""
    from conftest import run_gms

    norms = {}
    for wd in ("0", "50"):
        out = tmp_path / f"wd{wd}"
        run_gms("--threads", "2", "train", busi_dir, "-o", out, "--segments", "lesion", "--max-train", "8",
                "--max-val", "2", "--augment-copies", "1", "--warmup-epochs", "1", "--dice-samples", "0",
                "--epochs", "2", "--weight-decay", wd, "--no-postprocess-select", "--cache-dir", tmp_path / "cache",
                check=True)
        card = json.loads((out / "card.json").read_text())
        assert card["training"]["config"]["weight_decay"] == float(wd)
        lmm = torch.load(tmp_path / f"wd{wd}.work" / "last.pt", weights_only=True)["lmm"]
        norms[wd] = sum(float(v.float().pow(2).sum()) for k, v in lmm.items() if k.endswith("weight"))
    assert norms["50"] < 0.9 * norms["0"], norms
    p = run_gms("--threads", "2", "train", busi_dir, "-o", tmp_path / "bad", "--segments", "lesion",
                "--weight-decay", "-0.1")
    assert p.returncode == 2 and "--weight-decay must be" in p.stderr and not (tmp_path / "bad").exists()


def test_decoded_dice_on_several_heads_matches_per_head_terms(busi_dir, shared_dir, tmp_path):
    """--dice-heads 3 (the paper's loss: the decoded-Dice term on heads 2-4): the heads' latents are decoded in one
    batch and split back per head; the sum must equal the per-head terms computed one by one, and the Dice gradient
    must reach the weights of heads 2 and 3, which the final-head-only term leaves untouched. Real BUSI images
    through the shipped busi-lesion model and TAEF2."""
    from GMSSegmentLib.data import load_2d
    from GMSSegmentLib.model import load_model, resolve_model_path
    from GMSSegmentLib.pipeline import to_model_input
    from GMSSegmentLib.train import _resize_labels, decoded_dice_loss

    m = load_model(resolve_model_path("busi-lesion"), weights_dir=shared_dir / "models", device=torch.device("cpu"))
    names = json.loads((busi_dir / "split.json").read_text())["train"][:2]
    samples = [load_2d(busi_dir, n, [255], m.card["normalization"]) for n in names]
    x = torch.cat([to_model_input(s.image[None], 224, "cpu") for s in samples])
    labels = torch.stack([torch.from_numpy(_resize_labels(s.labels, 224)) for s in samples]).long()
    assert labels.sum() > 0
    codes = torch.tensor([seg["code"] for seg in m.card["segments"]], dtype=torch.float32)
    with torch.no_grad():
        zi = m.norm_image(m.foundation.encode(x))
    lmm = m.lmm.train().requires_grad_(True)  # loaded for inference, frozen
    with torch.no_grad():
        outs = lmm(zi)
        together = decoded_dice_loss(m, outs[-3:], labels, codes)
        apart = [decoded_dice_loss(m, [o], labels, codes) for o in outs[-3:]]
    assert all(0 < float(a) < 1 for a in apart)
    assert abs(float(together) - float(sum(apart))) < 1e-4
    assert len({round(float(a), 4) for a in apart}) == 3  # three different heads, not one counted three times

    def head_grads(heads):
        lmm.zero_grad(set_to_none=True)
        decoded_dice_loss(m, lmm(zi)[-heads:], labels, codes).backward()
        return [p.grad for p in lmm.heads[1].parameters()] + [p.grad for p in lmm.heads[2].parameters()]

    assert all(g is None for g in head_grads(1))
    assert all(g is not None and g.abs().sum() > 0 for g in head_grads(3))
    # other head counts are refused before any data is read or anything written
    from GMSSegmentLib.train import train
    with pytest.raises(GMSError, match="--dice-heads must be 1"):
        train(TrainConfig(data=str(busi_dir), output=str(tmp_path / "m"), dice_heads=4))
    assert not list(tmp_path.iterdir())
    from conftest import run_gms
    p = run_gms("train", busi_dir, "-o", tmp_path / "m", "--segments", "lesion", "--dice-heads", "0")
    assert p.returncode == 2 and "--dice-heads must be 1" in p.stderr and not list(tmp_path.iterdir())


def test_learning_rate_schedule_and_its_floor(busi_dir, tmp_path):
    """Warm-up, then cosine to 0 (the paper) or to --min-lr x --lr, over the steps or a time budget, whichever ends
    first; the floor reaches the optimiser of a real run (its checkpoint's last learning rate) and is recorded."""
    from conftest import run_gms
    from GMSSegmentLib.train import learning_rate

    lr, warm, total = 2e-3, 10, 110
    assert learning_rate(0, 0, lr, warm, total) == lr / warm and learning_rate(9, 0, lr, warm, total) == lr
    assert learning_rate(10, 0, lr, warm, total) == lr
    assert abs(learning_rate(60, 0, lr, warm, total) - lr / 2) < 1e-12  # half-way down the cosine
    assert learning_rate(110, 0, lr, warm, total) == 0.0
    assert learning_rate(110, 0, lr, warm, total, floor=0.25) == 0.25 * lr
    assert abs(learning_rate(60, 0, lr, warm, total, floor=0.25) - 0.625 * lr) < 1e-12
    assert learning_rate(20, 50.0, lr, warm, total, budget_s=100.0) == learning_rate(60, 0, lr, warm, total)
    assert learning_rate(20, 500.0, lr, warm, total, budget_s=100.0, floor=0.1) == 0.1 * lr  # budget spent

    out = tmp_path / "m"
    p = run_gms("--threads", "2", "train", busi_dir, "-o", out, "--segments", "lesion", "--max-train", "8",
                "--max-val", "2", "--augment-copies", "1", "--warmup-epochs", "0", "--dice-samples", "0",
                "--epochs", "3", "--max-minutes", "1e-6", "--min-lr", "0.25", "--no-postprocess-select", check=True)
    assert "time budget of 1e-06 min reached after epoch 1" in p.stdout
    ckpt = torch.load(tmp_path / "m.work" / "last.pt", weights_only=True)
    assert ckpt["opt"]["param_groups"][0]["lr"] == 0.25 * 2e-3
    assert json.loads((out / "card.json").read_text())["training"]["config"]["min_lr"] == 0.25
    p = run_gms("--threads", "2", "train", busi_dir, "-o", tmp_path / "bad", "--segments", "lesion", "--min-lr", "2")
    assert p.returncode == 2 and "--min-lr must be" in p.stderr and not (tmp_path / "bad").exists()


def test_adaptation_inherits_the_starting_models_segments(shared_dir, tmp_path):
    """gms train --init-from kvasir-polyp without --segments: the adapted model segments a 'polyp' (the starting
    model's names, colours, code colours, output labels and mask values), not the default 'lesion'."""
    from conftest import run_gms
    from GMSSegmentLib.modelpaths import resolve_model_path

    base = json.loads((resolve_model_path("kvasir-polyp") / "card.json").read_text())
    out = tmp_path / "adapted"
    p = run_gms("--threads", "2", "train", shared_dir / "data" / "kvasir-seg", "-o", out, "--init-from", "kvasir-polyp",
                "--max-train", "2", "--max-val", "1", "--augment-copies", "1", "--epochs", "1", "--warmup-epochs", "1",
                "--dice-samples", "1", "--no-postprocess-select", "--lr", "0", check=True)
    assert "segments ['polyp'] (mask values [255], from the --init-from model 'kvasir-polyp')" in p.stdout
    card = json.loads((out / "card.json").read_text())
    assert card["segments"] == base["segments"]
    assert card["training"]["label_values"] == base["training"]["label_values"] == [255]
    assert "polyp" in card["description"] and "lesion" not in json.dumps(card["segments"])

    # resuming from a checkpoint that is a pickle which would run code: refused in one line, never run, model kept
    class RunsCode:
        def __reduce__(self):
            return (open, (str(tmp_path / "pickle-ran"), "w"))

    before = (out / "card.json").read_bytes()
    torch.save({"lmm": RunsCode()}, tmp_path / "adapted.work" / "last.pt")
    p = run_gms("--threads", "2", "train", *p.args[p.args.index("train") + 1:])  # the same command again
    assert p.returncode == 2 and p.stderr.strip().splitlines() == [
        f"gms: error: refused to load the training checkpoint {tmp_path / 'adapted.work' / 'last.pt'}: the file holds "
        "objects other than tensors (a pickle that could run code); remove it or pass --no-resume"], p.stderr
    assert not (tmp_path / "pickle-ran").exists() and (out / "card.json").read_bytes() == before


def _two_label_2d_data(busi_dir, folder):
    """Three BUSI cases whose masks mark the lesion with the value 1 or 2 instead of 255."""
    from PIL import Image

    (folder / "images").mkdir(parents=True)
    (folder / "masks").mkdir()
    names = ["benign_3", "malignant_3", "benign_10"]
    for i, name in enumerate(names):
        (folder / "images" / f"{name}.png").write_bytes((busi_dir / "images" / f"{name}.png").read_bytes())
        mask = np.asarray(Image.open(busi_dir / "masks" / f"{name}.png").convert("L"))
        Image.fromarray(np.where(mask > 127, 1 + i % 2, 0).astype(np.uint8)).save(folder / "masks" / f"{name}.png")
    (folder / "split.json").write_text(json.dumps({"train": names}))
    return folder


def test_segments_that_do_not_match_the_data_are_refused(shared_dir, busi_dir, hippo_dir, tmp_path):
    """The segments (inherited from the --init-from model or given) against the data's mask values, before anything
    is encoded or written: one line (exit 2 from the command line), no model or work folder."""
    from conftest import run_gms
    from GMSSegmentLib.train import train

    data2 = _two_label_2d_data(busi_dir, tmp_path / "two-labels")
    out = tmp_path / "m"
    p = run_gms("train", shared_dir / "data" / "kvasir-seg", "-o", out, "--init-from", "hippocampus",
                "--max-train", "4", "--max-val", "1")
    assert p.returncode == 2 and p.stderr.strip().splitlines() == [
        "gms: error: segment 'anterior' (mask value 1, from the --init-from model 'hippocampus') occurs in none of the "
        f"5 masks of the training and validation cases in {shared_dir / 'data' / 'kvasir-seg'}: they hold {{255}}; "
        "give --segments and --label-values to match the data"], p.stderr
    cases = [  # (data, configuration, what the error says)
        (hippo_dir, {"init_from": "kvasir-polyp"},
         "segment 'polyp' (mask value 255, from the --init-from model 'kvasir-polyp') occurs in none"),
        (data2, {"init_from": "kvasir-polyp"},
         "segment 'polyp' (binary: mask values above 127, from the --init-from model 'kvasir-polyp') occurs in none "
         "of the 3 masks"),
        (data2, {"segments": ["lesion"]}, "they hold {1, 2}"),
        (data2, {"segments": ["a", "b", "c"]}, "segment 'c' (mask value 3, from --segments and their default values)"),
        (hippo_dir, {"segments": ["hippocampus"]}, "hold values [2] that no segment has (segments hippocampus = 1"),
    ]
    for data, conf, message in cases:
        with pytest.raises(GMSError) as err:
            train(TrainConfig(data=str(data), output=str(out), max_train=4, max_val=1, **conf))
        assert message in str(err.value) and "\n" not in str(err.value), (conf, str(err.value))
    assert not out.exists() and not (tmp_path / "m.work").exists()


def test_training_segments_inherit_colours_for_renamed_segments():
    from GMSSegmentLib.modelpaths import resolve_model_path
    from GMSSegmentLib.model import GMSModel as M
    from GMSSegmentLib.trainsegments import training_segments

    hippo = M.load(resolve_model_path("hippocampus")).card
    renamed = training_segments(["head", "tail"], None, "3d", hippo)
    assert renamed.names == ["head", "tail"] and renamed.label_values == [1, 2]
    assert [(s["label"], s["color"], s["code"]) for s in renamed.segments] == [
        (s["label"], s["color"], s["code"]) for s in hippo["segments"]]
    fresh = training_segments(["a", "b", "c"], None, "3d", hippo)  # another number of segments: from scratch
    assert fresh.label_values == [1, 2, 3] and not fresh.values_given and "default" in fresh.origin
    with pytest.raises(GMSError, match="2 segment names but 1 label values"):
        training_segments(["a", "b"], [1], "2d")
