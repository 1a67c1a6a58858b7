"""Fashion-MNIST (Xiao, Rasul and Vollgraf 2017, Zalando Research; MIT licence): MNIST's
layout and sizes with ten kinds of clothing instead of digits. Not shipped (30 MB): found
in DIR/FashionMNIST/raw (torchvision's layout, where its download puts it), in a folder
holding the four files directly, or in Debian's `dataset-fashion-mnist` package folder;
otherwise downloaded by torchvision when a network is there.
"""
from __future__ import annotations


from utils.datasets import idx
from utils.datasets.base import Dataset
from utils.datasets.mnist import locate

NAME = "fashion-mnist"
CLASS_NAMES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
               "Sneaker", "Bag", "Ankle boot")
TRAIN_SIZE = 60_000
DEBIAN = "/usr/share/datasets/fashion-mnist"  # Debian's dataset-fashion-mnist package
FAMILY = idx.IdxFamily(
    title="Fashion-MNIST",
    sha256={  # of the unpacked published files (any compression of them is accepted)
        "train-images-idx3-ubyte": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
        "train-labels-idx1-ubyte": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
        "t10k-images-idx3-ubyte": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
        "t10k-labels-idx1-ubyte": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
    },
    fix="copy the original file there again (torchvision's download, or Debian's "
        "dataset-fashion-mnist package)")


def open_dataset(data_dir=None, download: bool = True, **_) -> Dataset:
    folder = locate(data_dir, "FashionMNIST", FAMILY, download, "FashionMNIST",
                    extra=(DEBIAN,), hint=f"offline: `apt install dataset-fashion-mnist` "
                                          f"(files in {DEBIAN}) or --data-dir FOLDER")
    idx.verify_all(folder, FAMILY)
    return Dataset(NAME, FAMILY.title, CLASS_NAMES, 1, 28, folder,
                   idx.content_fingerprint(FAMILY),
                   lambda split: idx.load_split(folder, split, FAMILY),
                   split="60,000 training and 10,000 test images (the published split)")
