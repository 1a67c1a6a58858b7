"""The evaluation metric: FID against closed forms, rankings that must hold, and the
shipped classifier (its hash, its accuracy, a clear error when its file changes)."""
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import generate
from helpers import expect_one_line
from evaluation import classifier as clf
from evaluation.metrics import (Evaluator, calibration, class_coverage, feature_statistics,
                                format_report, frechet_distance, nearest_neighbour_distance)
from training.trainer import Trainer
from utils.files import save_json


def test_frechet_distance_of_1d_gaussians_matches_closed_form():
    # W2^2 between N(m1, s1^2) and N(m2, s2^2) is (m1 - m2)^2 + (s1 - s2)^2
    for m1, s1, m2, s2 in [(0, 1, 0, 1), (1, 2, -1, 0.5), (3, 0.1, 3, 4)]:
        fid = frechet_distance([m1], [[s1 ** 2]], [m2], [[s2 ** 2]])
        assert fid == pytest.approx((m1 - m2) ** 2 + (s1 - s2) ** 2, rel=1e-9, abs=1e-12)


def test_frechet_distance_matches_direct_computation_on_small_gaussians():
    rng = np.random.default_rng(0)
    for dim in (2, 5, 8):
        a, b = rng.normal(size=(dim, dim)), rng.normal(size=(dim, dim))
        s1, s2 = a @ a.T + 0.1 * np.eye(dim), b @ b.T + 0.1 * np.eye(dim)
        m1, m2 = rng.normal(size=dim), rng.normal(size=dim)
        # tr((S1 S2)^1/2) from the eigenvalues of S1 S2 (real, non-negative: similar to a PSD matrix)
        trace_sqrt = np.sqrt(np.clip(np.linalg.eigvals(s1 @ s2).real, 0, None)).sum()
        direct = ((m1 - m2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * trace_sqrt
        assert frechet_distance(m1, s1, m2, s2) == pytest.approx(direct, rel=1e-8)
    try:
        from scipy.linalg import sqrtm
    except ImportError:
        return
    covmean = sqrtm(s1 @ s2).real
    reference = ((m1 - m2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean)
    assert frechet_distance(m1, s1, m2, s2) == pytest.approx(reference, rel=1e-6)


def test_frechet_distance_is_stable_for_singular_covariances():
    rng = np.random.default_rng(1)
    low_rank = rng.normal(size=(6, 2))
    s = low_rank @ low_rank.T  # rank 2 of 6
    assert frechet_distance(np.zeros(6), s, np.zeros(6), s) == pytest.approx(0.0, abs=1e-9)
    fid = frechet_distance(np.zeros(6), s, np.ones(6), np.zeros((6, 6)))
    assert math.isfinite(fid) and fid == pytest.approx(6 + np.trace(s), rel=1e-9)


def test_fid_of_a_set_against_itself_is_zero():
    features = torch.randn(500, 16, generator=torch.Generator().manual_seed(0)).double()
    mu, sigma = feature_statistics(features)
    assert frechet_distance(mu, sigma, mu, sigma) == pytest.approx(0.0, abs=1e-8)


def test_class_coverage_flags_a_single_digit():
    one_class = F.one_hot(torch.full((100,), 3), 10).double()
    balanced = F.one_hot(torch.arange(100) % 10, 10).double()
    assert class_coverage(one_class)["class_kl"] == pytest.approx(math.log(10))
    assert class_coverage(balanced)["class_kl"] == pytest.approx(0.0, abs=1e-12)


def test_nearest_neighbour_distance_finds_copies():
    ref = torch.randint(0, 256, (50, 28, 28), dtype=torch.uint8)
    assert nearest_neighbour_distance(ref[:5], ref).abs().max() < 0.05
    assert nearest_neighbour_distance(torch.zeros(3, 28, 28, dtype=torch.uint8), ref).min() > 1


@pytest.fixture
def evaluator(quick_evaluator):
    return quick_evaluator


def test_metric_ranks_real_over_blurred_over_noise(evaluator):
    scores = calibration(evaluator, 1000)  # what README's calibration table reports at 10,000
    fid = {k: v["fid"] for k, v in scores.items()}
    assert fid["real"] * 5 < fid["blurred"] and fid["blurred"] * 2 < fid["noise"], fid
    assert scores["real"]["confident_fraction"] > scores["blurred"]["confident_fraction"]
    # recall: a set of one repeated feature (noise collapses to one point, blur to a few)
    # covers little of the real manifold. Precision is not ranked here: whether one
    # collapsed point falls in some real digit's k-NN ball depends on the classifier.
    assert scores["real"]["precision"] > 0.5 and scores["real"]["recall"] > 0.3
    assert scores["blurred"]["recall"] < 0.1 and scores["noise"]["recall"] < 0.1
    assert scores["real"]["class_kl"] < 0.05


def test_coverage_flags_a_set_of_one_digit(evaluator, mnist):
    images, labels = mnist.load("train")
    sevens = images[-5000:][labels[-5000:] == 7][:500]
    result = evaluator.evaluate(sevens, floor=False, memorisation=False)
    assert result["class_kl"] > 1.8  # log(10) = 2.30 for one class
    assert result["max_class_fraction"] > 0.85
    assert result["recall"] < 0.5


def test_full_report_with_floor_and_memorisation(evaluator, tmp_path):
    copies = evaluator.train_images[:300]
    result = evaluator.evaluate(copies)
    assert result["nn_train_distance"] < 0.05  # training digits themselves: copies
    assert result["floor"]["nn_train_distance"] > 1.0  # unseen test digits are not
    assert result["floor"]["num_samples"] == 300
    text = format_report(result, "copies")
    assert "FID" in text and "real images" in text
    data = json.loads(save_json(result, tmp_path / "r.json").read_text())
    assert data["floor"]["fid"] == pytest.approx(result["floor"]["fid"])


def test_evaluate_npz_from_the_command_line(tmp_path, data_dir, shared_evaluator, capsys):
    path = tmp_path / "digits.npz"
    np.savez(path, samples=shared_evaluator.train_images[:200, 0].numpy())
    assert generate.main(["--evaluate-npz", str(path), "--data-dir", str(data_dir), "--no-download",
                          "--output-dir", str(tmp_path / "out"),
                          "--device", "cpu", "--quiet", "--output", str(tmp_path / "g.png")]) == 0
    out = capsys.readouterr().out
    assert "FID" in out and (tmp_path / "out" / "eval_digits.json").is_file()
    bad = tmp_path / "bad.npz"
    np.savez(bad, samples=np.zeros((3, 28, 28), dtype=np.float32))
    line = expect_one_line(capsys, generate.main, ["--evaluate-npz", str(bad), "--output",
                                                   str(tmp_path / "g.png")])
    assert "must be uint8 (N, H, W)" in line


def test_evaluation_during_training_is_logged_and_plotted(tiny, quick_evaluator):
    messages = []
    config = tiny(EPOCHS=3, EVAL_EVERY=2, EVAL_SAMPLES=40)
    trainer = Trainer(config, progress=False, log=messages.append, evaluator=quick_evaluator)
    trainer.fit()
    assert [e["epoch"] for e in trainer.evaluations] == [2, 3]  # every 2 epochs, and at the end
    assert all(e["num_samples"] == 40 and e["fid"] > e["fid_floor"] for e in trainer.evaluations)
    assert any("FID" in m and "on 40 samples" in m for m in messages)
    out = Path(config.OUTPUT_DIR)
    assert (out / "training_curves.png").is_file()
    saved = json.loads((out / "evaluations.json").read_text())["evaluations"]
    assert len(saved) == 2 and saved[0]["fid"] == pytest.approx(trainer.evaluations[0]["fid"])
    # the same noise every time: evaluating the same weights again gives the same FID
    again = trainer.evaluate()
    assert again["fid"] == pytest.approx(trainer.evaluations[-1]["fid"], rel=1e-6)


def test_shipped_classifier_has_its_recorded_hash_and_accuracy(evaluator, mnist):
    shipped = clf.SHIPPED["mnist"]
    weights = clf.WEIGHTS_DIR / shipped.file
    info = evaluator.classifier_info
    assert info["sha256"] == shipped.sha256 == clf.sha256_of(weights)
    assert info["train_size"] == 60000 and info["seed"] == 0
    assert weights.stat().st_size < 4 * 2 ** 20  # small enough to keep in git
    images, labels = mnist.load("test")
    measured = clf.accuracy(evaluator.classifier, images, labels)
    assert measured >= shipped.min_accuracy
    assert measured == pytest.approx(info["test_accuracy"], abs=2e-4)  # at most 2 digits differ


def test_a_changed_or_missing_weights_file_is_one_clear_error(tmp_path):
    changed = tmp_path / "mnist_classifier.pt"
    data = bytearray((clf.WEIGHTS_DIR / clf.SHIPPED["mnist"].file).read_bytes())
    data[len(data) // 2] ^= 1  # one bit in the middle of the weights
    changed.write_bytes(bytes(data))
    with pytest.raises(clf.ClassifierError, match=r"SHA-256 .* not the recorded .*--retrain") as info:
        clf.load_shipped("mnist", path=changed)
    assert "\n" not in str(info.value)
    with pytest.raises(clf.ClassifierError, match="missing.*--retrain"):
        clf.load_shipped("mnist", path=tmp_path / "absent.pt")


@pytest.mark.slow
def test_classifier_training_is_deterministic_and_quick_ones_are_cached(mnist, tmp_path):
    """What makes `--retrain` reproduce the shipped file: the same seed gives the same
    weights, bit for bit (here on a small subset, one epoch, one process and thread count)."""
    images, labels = mnist.load("train")
    images, labels = images[:256], labels[:256]
    a = clf.train_classifier(images, labels, epochs=1, seed=3, progress=False).state_dict()
    b = clf.train_classifier(images, labels, epochs=1, seed=3, progress=False).state_dict()
    c = clf.train_classifier(images, labels, epochs=1, seed=4, progress=False).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)
    logged = []
    first, info = clf.load_or_train(mnist, tmp_path, train_size=512, epochs=1, progress=False,
                                    log=logged.append)
    again, info_again = clf.load_or_train(mnist, tmp_path, train_size=512, epochs=1,
                                          progress=False, log=logged.append)
    assert not info["cached"] and info_again["cached"] and len(logged) == 2  # trained once
    assert info["train_size"] == 512 and Path(info["path"]).parent == tmp_path
    assert mnist.fingerprint[:16] in Path(info["path"]).name  # keyed by the data
    x = torch.rand(4, 1, 28, 28) * 2 - 1
    assert torch.equal(first(x), again(x))
    evaluator = Evaluator(mnist, device="cpu", progress=False, classifier=(first, info))
    assert evaluator.classifier_info["train_size"] == 512
