"""Clusters of the training images as classes (--clusters, Bao et al. 2022): k-means, the
clusters drawn when sampling, the run that learns them, and what the scripts say."""
from __future__ import annotations

import pytest
import torch

import generate
from config import Config, ConfigError, training_command
from helpers import expect_one_line, quiet, train
from models.diffusion import DiffusionModel
from sampling.settings import choose_classes
from training.trainer import Trainer
from utils import checkpoint as ckpt
from utils.clusters import cluster_images, clusters_of, kmeans


def test_kmeans_finds_separated_groups():
    """Three tight groups far apart: k-means with k = 3 puts each in its own cluster."""
    generator = torch.Generator().manual_seed(1)
    truth = torch.arange(300) % 3
    centres = torch.tensor([[0.0, 0.0, 0.0], [10.0, 0.0, 0.0], [0.0, 10.0, 5.0]])
    points = centres[truth] + 0.3 * torch.randn(300, 3, generator=generator)
    found, assignment = kmeans(points, 3)
    pairs = {(int(a), int(t)) for a, t in zip(assignment, truth)}
    assert len(pairs) == 3 and len({a for a, _ in pairs}) == 3  # a one-to-one match
    for a, t in pairs:
        assert torch.allclose(found[a], centres[t], atol=0.15)
    with pytest.raises(ValueError, match="2 <= k <= 300"):
        kmeans(points, 301)


def test_cluster_images_gives_every_image_one_cluster(mnist):
    images, _ = mnist.load("test")
    ids, sizes = cluster_images(images[:500], 8)
    assert ids.shape == (500,) and ids.dtype == torch.int64
    assert len(sizes) == 8 and sum(sizes) == 500 and min(sizes) > 0
    assert sizes == tuple(torch.bincount(ids, minlength=8).tolist())
    # the same images give the same clusters (the seed is fixed)
    again, _ = cluster_images(images[:500], 8)
    assert torch.equal(ids, again)


def test_clusters_are_drawn_in_proportion_to_their_sizes():
    sizes = (500, 0, 1500, 3000, 5000)
    drawn = clusters_of(sizes, range(10_000))
    shares = torch.bincount(drawn, minlength=5).double() / 10_000
    expected = torch.tensor(sizes, dtype=torch.float64) / sum(sizes)
    assert (shares - expected).abs().max() < 0.002
    assert shares[1] == 0  # an empty cluster is never drawn
    # sample i's cluster depends on i alone, not on where a batch starts
    assert torch.equal(clusters_of(sizes, range(37, 90)), drawn[37:90])
    assert torch.equal(clusters_of(sizes, torch.arange(37, 90)), drawn[37:90])
    # consecutive samples mix the clusters (a grid is not sorted by cluster)
    assert len(set(drawn[:10].tolist())) >= 3


def test_clusters_replace_the_labels_in_the_config():
    config = Config.from_preset("cpu", CLUSTERS=50)
    assert not config.CONDITIONAL and config.num_classes == 50
    assert Config(CONDITIONAL=True, CLASS_NAMES=("a", "b", "c")).num_classes == 3
    assert Config().num_classes == 0
    with pytest.raises(ConfigError, match="add --no-conditional"):
        Config.from_preset("cpu", CLUSTERS=50, CONDITIONAL=True).validate()
    with pytest.raises(ConfigError, match="--clusters must be 0"):
        Config(CLUSTERS=1).validate()
    assert "--clusters 50" in training_command(config)
    assert "--conditional" not in training_command(config)


def test_a_run_learns_the_clusters_and_samples_them(tiny, tmp_path, monkeypatch):
    trainer = train(tiny(CLUSTERS=5, MAX_STEPS=4, SAVE_EVERY=100))
    sizes = trainer.config.CLUSTER_SIZES
    assert len(sizes) == 5 and sum(sizes) == 64  # TRAIN_SIZE: the images trained on
    assert trainer.model.unet.class_embed.num_embeddings == 6  # 5 clusters and "no class"
    assert torch.equal(trainer.batcher.labels.cpu(), trainer.cluster_ids)
    state = ckpt.load_checkpoint(tmp_path / "ck" / ckpt.LATEST)
    assert torch.equal(state["clusters"].long(), trainer.cluster_ids)
    assert tuple(state["config"]["CLUSTER_SIZES"]) == sizes

    # a resumed run takes the recorded clusters: k-means does not run again
    monkeypatch.setattr("training.trainer.cluster_images",
                        lambda *a: pytest.fail("k-means ran again on resume"))
    resumed = Trainer(Config.from_dict(state["config"]), resume=state, progress=False, log=quiet)
    assert torch.equal(resumed.cluster_ids, trainer.cluster_ids)

    # sampling without labels draws image i from cluster clusters_of(sizes, i)
    model, _ = DiffusionModel.from_checkpoint(tmp_path / "ck" / ckpt.LATEST)
    seen = []
    unet_forward = model.unet.forward
    monkeypatch.setattr(model.unet, "forward",
                        lambda x, t, labels=None: seen.append(labels) or unet_forward(x, t, labels))
    model.generate(6, batch_size=4, first_index=3, progress=False, sampler="ddim", steps=2)
    assert torch.equal(torch.cat([seen[0], seen[2]]), clusters_of(sizes, range(3, 9)))


def test_the_scripts_refuse_to_choose_a_cluster(tiny, tmp_path, capsys):
    train(tiny(CLUSTERS=4, MAX_STEPS=2, SAVE_EVERY=100))
    path = tmp_path / "ck" / ckpt.LATEST
    config = Config.from_dict(ckpt.load_checkpoint(path)["config"])
    with pytest.raises(ConfigError, match="learned 4 k-means clusters"):
        choose_classes(config, [3], "--digit")
    assert choose_classes(config) is None  # pictures are plain grids
    for flags in (["--digit", "3"], ["--interpolate-digits", "1", "2"]):
        message = expect_one_line(capsys, generate.main, ["--checkpoint", path, *flags])
        assert "learned 4 k-means clusters" in message and flags[0] in message


def test_more_clusters_than_images_is_refused_in_one_line(tiny):
    with pytest.raises(ConfigError, match=r"--clusters 100 exceeds the 64 training images.*"
                                          r"--clusters 0: none"):
        Trainer(tiny(CLUSTERS=100), progress=False, log=quiet)
