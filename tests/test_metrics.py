"""The evaluation metric: FID against closed forms, and rankings that must hold.

The classifier here is trained briefly on a subset (seconds, not minutes); the
rankings must hold even for it.
"""
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from utils.metrics import (Evaluator, class_coverage, feature_statistics, format_report,
                           frechet_distance, nearest_neighbour_distance)


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


def _blur(images: torch.Tensor) -> torch.Tensor:
    x = images.float().unsqueeze(1)
    kernel = torch.ones(1, 1, 5, 5) / 25
    return F.conv2d(x, kernel, padding=2).round().clamp(0, 255).to(torch.uint8)[:, 0]


def test_metric_ranks_real_over_blurred_over_noise(evaluator):
    n = 1000
    real = evaluator.train_images[-n:]
    noise = torch.randint(0, 256, (n, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    scores = {name: evaluator.evaluate(images, floor=False, memorisation=False)
              for name, images in [("real", real), ("blurred", _blur(real)), ("noise", noise)]}
    fid = {k: v["fid"] for k, v in scores.items()}
    assert fid["real"] * 5 < fid["blurred"] and fid["blurred"] * 2 < fid["noise"], fid
    assert scores["real"]["confident_fraction"] > scores["blurred"]["confident_fraction"]
    # recall: a set of one repeated feature (noise collapses to one point, blur to a few)
    # covers little of the real manifold. Precision is not ranked here: whether one
    # collapsed point falls in some real digit's k-NN ball depends on the classifier.
    assert scores["real"]["precision"] > 0.5 and scores["real"]["recall"] > 0.3
    assert scores["blurred"]["recall"] < 0.1 and scores["noise"]["recall"] < 0.1
    assert scores["real"]["class_kl"] < 0.05


def test_coverage_flags_a_set_of_one_digit(evaluator, data_dir):
    from utils.data_loader import load_mnist

    images, labels = load_mnist(data_dir, train=True)
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
    assert "FID" in text and "real digits" in text
    from utils.metrics import save_json

    data = json.loads(save_json(result, tmp_path / "r.json").read_text())
    assert data["floor"]["fid"] == pytest.approx(result["floor"]["fid"])


def test_evaluate_npz_from_the_command_line(tmp_path, data_dir, evaluator, capsys):
    import generate

    path = tmp_path / "digits.npz"
    np.savez(path, samples=evaluator.train_images[:200].numpy())
    # let the script find the fixture's quick classifier under the default cache name
    from pathlib import Path

    from utils.classifier import classifier_path

    cache = tmp_path / "ck"
    cache.mkdir()
    (cache / classifier_path(cache).name).symlink_to(Path(evaluator.classifier_info["path"]))
    assert generate.main(["--evaluate-npz", str(path), "--data-dir", str(data_dir), "--no-download",
                          "--checkpoint-dir", str(cache), "--output-dir", str(tmp_path / "out"),
                          "--device", "cpu", "--quiet", "--output", str(tmp_path / "g.png")]) == 0
    out = capsys.readouterr().out
    assert "FID" in out and (tmp_path / "out" / "eval_digits.json").is_file()
    bad = tmp_path / "bad.npz"
    np.savez(bad, samples=np.zeros((3, 28, 28), dtype=np.float32))
    with pytest.raises(SystemExit) as info:
        generate.main(["--evaluate-npz", str(bad), "--output", str(tmp_path / "g.png")])
    assert info.value.code == 2
    assert "must be uint8 (N, 28, 28)" in capsys.readouterr().err


def test_evaluation_during_training_is_logged_and_plotted(tiny, quick_evaluator):
    from pathlib import Path

    from utils.trainer import Trainer

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
