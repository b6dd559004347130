"""The prediction tool on a real checkpoint: 1 and 2 ranks against a dense reference, metrics, errors."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed.checkpoint as dcp
import torch.nn.functional as F
from launcher import REPO, environment, launch

from hydrahead.config import Config, config_from_dict
from hydrahead.data.folder import ImageFolder
from hydrahead.eval.metrics import means, multi_label_sums
from hydrahead.models import build_backbone
from hydrahead.tools import predict as predict_module
from hydrahead.tools.export_head import export_head
from hydrahead.tools.predict import main, open_input
from hydrahead.train.checkpoint import latest_checkpoint, read_meta

NUM_SAMPLES, NUM_CLASSES, INPUT_DIM = 37, 101, 16
K = 5
# --batch-size 8 on 2 ranks: global batches of 16, the last one 5 rows (3 on rank 0, 2 on rank 1).
BATCH = 8


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A run trained by the real launcher on 3 ranks: predicting on 1 or 2 re-splits the head.
    Over random active rows with momentum and decay, so the checkpoint's rows owe steps
    that predictions must pay (as the reference's export does)."""
    run = tmp_path_factory.mktemp("predict") / "run"
    launch(
        run,
        3,
        "train.steps=4",
        "train.eval_every=0",
        "head.selection=random",
        "head.budget=0.3",
        "head.weight_decay=0.01",
        timeout=120,
    )
    assert read_meta(latest_checkpoint(run))["head_deferred"]
    return run


@pytest.fixture(scope="module")
def features() -> np.ndarray:
    # Multiples of 1/64: exact in float32 and in the text of an XC file.
    values = np.random.default_rng(0).normal(size=(NUM_SAMPLES, INPUT_DIM))
    return (np.round(values * 64) / 64).astype(np.float32)


@pytest.fixture(scope="module")
def reference(run_dir, features, tmp_path_factory) -> tuple[torch.Tensor, torch.Tensor]:
    """(scores, ids) of every class, best first, computed densely in float64 in this process:
    the backbone loaded from the checkpoint, the head from its export."""
    checkpoint = latest_checkpoint(run_dir)
    cfg = config_from_dict(read_meta(checkpoint)["config"])
    assert cfg.head.margin_type == "cosface" and not cfg.head.unit_scaling  # logits: scale * cos
    m = cfg.model
    backbone = build_backbone(m.backbone, m.embed_dim, input_dim=m.input_dim, hidden_dim=m.hidden_dim, depth=m.depth)
    state = {"backbone": backbone.state_dict()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.load(state, storage_reader=dcp.FileSystemReader(str(checkpoint)), no_dist=True)
    weight = np.load(export_head(checkpoint, tmp_path_factory.mktemp("head") / "head.npy", progress=False))
    with torch.no_grad():
        embeddings = backbone(torch.from_numpy(features)).double()
    logits = cfg.head.scale * F.normalize(embeddings, dim=1) @ F.normalize(torch.from_numpy(weight).double(), dim=1).T
    scores, ids = logits.sort(dim=1, descending=True)
    # The top K+1 are far apart compared with float32 rounding, so exact ids are a fair demand.
    assert (scores[:, :K] - scores[:, 1 : K + 1]).min() > 1e-4
    return scores, ids


def run_predict(nproc: int, *args) -> subprocess.CompletedProcess:
    tool = ["-m", "hydrahead.tools.predict"]
    launcher = [] if nproc == 1 else ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    proc = subprocess.run(
        [sys.executable, *launcher, *tool, *map(str, args), "--no-progress"],
        cwd=REPO,
        env=environment(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-6000:]}"
    return proc


def read_predictions(out: Path, k: int) -> tuple[np.ndarray, np.ndarray]:
    if out.suffix == ".npy":
        return np.load(out), np.load(out.with_suffix(".scores.npy"))
    lines = out.read_text().splitlines()
    assert lines[0].split("\t") == [f"id_{i}" for i in range(1, k + 1)] + [f"score_{i}" for i in range(1, k + 1)]
    table = np.loadtxt(out, skiprows=1, delimiter="\t", ndmin=2)
    return table[:, :k].astype(np.int64), table[:, k:]


def check_against_reference(out: Path, k: int, reference) -> None:
    ids, scores = read_predictions(out, k)
    ref_scores, ref_ids = reference
    assert ids.shape == (NUM_SAMPLES, k)
    np.testing.assert_array_equal(ids, ref_ids[:, :k].numpy())
    np.testing.assert_allclose(scores, ref_scores[:, :k].numpy(), rtol=0, atol=2e-5)


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


@pytest.mark.parametrize("nproc, suffix", [(1, ".tsv"), (2, ".npy")])
def test_features_and_labels(run_dir, features, reference, tmp_path, nproc, suffix):
    _, ref_ids = reference
    # Labels that the model gets right at rank 0, at rank 2, and (mostly) not at all.
    chance = torch.from_numpy(np.random.default_rng(1).integers(0, NUM_CLASSES, NUM_SAMPLES))
    labels = torch.where(
        torch.arange(NUM_SAMPLES) % 3 == 0,
        ref_ids[:, 0],
        torch.where(torch.arange(NUM_SAMPLES) % 3 == 1, ref_ids[:, 2], chance),
    )
    np.save(tmp_path / "features.npy", features)
    np.save(tmp_path / "labels.npy", labels.numpy())
    out = tmp_path / f"top{suffix}"

    proc = run_predict(
        nproc,
        run_dir,
        tmp_path / "features.npy",
        "--out",
        out,
        "--labels",
        tmp_path / "labels.npy",
        "--batch-size",
        BATCH,
    )
    check_against_reference(out, K, reference)
    metrics = read_json(out.with_suffix(".metrics.json"))
    top1 = (ref_ids[:, 0] == labels).double().mean().item()
    top5 = (ref_ids[:, :5] == labels[:, None]).any(dim=1).double().mean().item()
    assert 0 < top1 < top5 < 1
    assert metrics["samples"] == NUM_SAMPLES and metrics["step"] == 4 and metrics["k"] == K
    assert metrics["top1"] == pytest.approx(top1, abs=1e-12) and metrics["top5"] == pytest.approx(top5, abs=1e-12)
    assert f"top1 {100 * top1:.2f}%" in proc.stdout
    assert sorted(p.name for p in tmp_path.iterdir() if ".partial" in p.name) == []


def write_xc_file(path: Path, features: np.ndarray, positives: list[list[int]]) -> None:
    lines = [f"{len(features)} {features.shape[1]} {NUM_CLASSES}"]
    for row, labels in zip(features, positives):
        entries = " ".join(f"{index}:{value!r}" for index, value in enumerate(row.tolist()) if value != 0)
        lines.append(",".join(map(str, labels)) + " " + entries)
    path.write_text("\n".join(lines) + "\n")


@pytest.mark.parametrize("nproc, suffix", [(1, ".npy"), (2, ".tsv")])
def test_extreme_classification_file(run_dir, features, reference, tmp_path, nproc, suffix):
    _, ref_ids = reference
    rng = np.random.default_rng(2)
    positives = []
    for sample, ranked in enumerate(ref_ids.tolist()):
        chosen = {0: [], 1: [ranked[0]], 2: [ranked[1], ranked[4], ranked[50]]}.get(sample % 4)
        positives.append(chosen if chosen is not None else rng.choice(NUM_CLASSES, size=4, replace=False).tolist())
    write_xc_file(tmp_path / "test.txt", features, positives)
    out, k = tmp_path / f"top{suffix}", 3  # fewer written than the metrics look at

    proc = run_predict(nproc, run_dir, tmp_path / "test.txt", "--out", out, "-k", k, "--batch-size", BATCH)
    check_against_reference(out, k, reference)
    width = max(len(labels) for labels in positives)
    padded = torch.tensor([labels + [-1] * (width - len(labels)) for labels in positives])
    expected = means(multi_label_sums(ref_ids[:, :5], padded, ks=(1, 3, 5)))
    metrics = read_json(out.with_suffix(".metrics.json"))
    assert expected["samples_without_positives"] == 10 and 0 < expected["nDCG@5"] < 1
    for name, value in expected.items():
        assert metrics[name] == pytest.approx(value, abs=1e-12), name
    assert "without labels (scored 0)" in proc.stdout


# ---------------------------------------------------------------------------------------
# Mistakes: reported before any process group or output exists
# ---------------------------------------------------------------------------------------


@pytest.fixture()
def inputs(tmp_path, features) -> dict[str, Path]:
    np.save(tmp_path / "features.npy", features)
    np.save(tmp_path / "narrow.npy", features[:, :-1])
    np.save(tmp_path / "short_labels.npy", np.zeros(NUM_SAMPLES - 1, dtype=np.int64))
    np.save(tmp_path / "bad_labels.npy", np.full(NUM_SAMPLES, NUM_CLASSES, dtype=np.int64))
    (tmp_path / "exists.tsv").write_text("keep me")
    (tmp_path / "big_label.txt").write_text("1 16 101\n101 0:1.0\n")
    (tmp_path / "images" / "a").mkdir(parents=True)
    return {p.stem: p for p in tmp_path.iterdir()}


@pytest.mark.parametrize(
    "args, message",
    [
        (["{missing}", "{features}"], "neither a checkpoint folder"),
        (["{run}", "{features}", "-k", "102"], r"k must be an int in \[1, 101\]"),
        (["{run}", "{narrow}"], "are 15 wide, but the checkpoint's model.input_dim=16"),
        (["{run}", "{features}", "--labels", "{short_labels}"], "has 36 rows, but the input has 37 samples"),
        (["{run}", "{features}", "--labels", "{bad_labels}"], r"101 at \(0,\) is outside \[0, 101\)"),
        (
            ["{run}", "{big_label}"],
            r"big_label.txt:2: label id 101 is out of range: num_labels=101 .*head.num_classes=101",
        ),
        (["{run}", "{images}"], "holds images, but the checkpoint's model.backbone=mlp takes feature vectors"),
        (["{run}", "{features}", "--input-kind", "image_list"], "holds images, but"),
        (["{run}", "{missing}"], "input .*missing does not exist"),
    ],
)
def test_mistakes_are_clear_errors(run_dir, inputs, tmp_path, capsys, args, message):
    names = {"run": run_dir, "missing": tmp_path / "missing", **inputs}
    out = tmp_path / "out.tsv"
    assert main([arg.format(**names) for arg in args] + ["--out", str(out)]) == 1
    error = capsys.readouterr().err
    assert error.startswith("predict: error: ") and re.search(message, error), error
    assert not out.exists()


def test_outputs_are_not_overwritten_without_force(run_dir, inputs, capsys):
    assert main([str(run_dir), str(inputs["features"]), "--out", str(inputs["exists"])]) == 1
    assert "exists.tsv exists; pass --force" in capsys.readouterr().err
    assert inputs["exists"].read_text() == "keep me"
    assert main([str(run_dir), str(inputs["features"]), "--out", str(inputs["exists"].with_suffix(".csv"))]) == 1
    assert "--out must end in .tsv or .npy" in capsys.readouterr().err


def test_the_ranks_verify_the_checkpoint_before_loading_it(run_dir, features, tmp_path):
    """Two ranks share the checking: rank 1 hashes the file rank 1 wrote, and its finding
    stops rank 0 too. The run's only checkpoint is damaged, so nothing is predicted."""
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    data = latest_checkpoint(run) / "__1_0.distcp"
    flipped = bytearray(data.read_bytes())
    flipped[len(flipped) // 2] ^= 0x01
    data.write_bytes(bytes(flipped))
    np.save(tmp_path / "features.npy", features)
    out = tmp_path / "out.tsv"
    launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    proc = subprocess.run(
        [sys.executable, *launcher, "-m", "hydrahead.tools.predict", str(run), str(tmp_path / "features.npy")]
        + ["--out", str(out), "--no-progress"],
        cwd=REPO,
        env=environment(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0
    for rank in (0, 1):
        assert re.search(
            rf"predict: error \(rank {rank}\): no checkpoint in .* can be loaded: step-4 \(damaged: "
            r"__1_0\.distcp does not match its checksum",
            proc.stderr,
        ), proc.stderr[-3000:]
    assert not out.exists()


def test_every_option_has_help():
    parser = predict_module.build_parser()
    for action in parser._actions:
        assert action.help, action.option_strings or action.dest


# ---------------------------------------------------------------------------------------
# Image inputs: read as the training run's evaluation reads them
# ---------------------------------------------------------------------------------------


def test_image_folder_and_image_list(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(3)
    for name, size in [("cat/1.png", (12, 10)), ("cat/2.png", (9, 9)), ("dog/1.png", (10, 14))]:
        (tmp_path / "images" / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(tmp_path / "images" / name)
    cfg = Config()
    cfg.model.backbone, cfg.data.image_size, cfg.head.num_classes = "resnet18", 8, 2
    folder = open_input(tmp_path / "images", cfg)
    want_images, want_labels = ImageFolder(tmp_path / "images", image_size=8, split="eval", num_classes=2).batch(
        torch.arange(3)
    )
    images, labels = folder.read(0, 3)
    assert folder.labels == "single" and folder.num_samples == 3
    assert torch.equal(images, want_images) and labels.tolist() == want_labels.tolist() == [0, 0, 1]

    # A list in another order, one path absolute; its labels from a .npy.
    (tmp_path / "list.txt").write_text(f"images/dog/1.png\n\n{tmp_path / 'images/cat/1.png'}\nimages/cat/2.png\n")
    np.save(tmp_path / "labels.npy", np.array([1, 0, 0]))
    listed = open_input(tmp_path / "list.txt", cfg, labels=tmp_path / "labels.npy")
    assert listed.labels == "single" and listed.num_samples == 3
    images, labels = listed.read(0, 3)
    assert torch.equal(images, want_images[[2, 0, 1]]) and labels.tolist() == [1, 0, 0]
    empty, no_labels = listed.read(3, 3)
    assert empty.shape == (0, 3, 8, 8) and no_labels.shape == (0,)
    with pytest.raises(ValueError, match="carries its own labels"):
        open_input(tmp_path / "images", cfg, labels=tmp_path / "labels.npy")
