"""Real handwritten digits without a download, served where a program asks
torchvision for MNIST.

The images are the test part of the UCI "Optical Recognition of Handwritten Digits"
data set (Alpaydin and Kaynak 1998): 1,797 digits written by 13 people, each scanned
at 32x32 and reduced to 8x8 counts of 0..16 "on" pixels, as scikit-learn ships it
(``sklearn.datasets.load_digits``). ``data/README.md`` gives its terms. MNIST itself
(28x28, 70,000 images) is a download, and these machines are offline.

``torchvision_stand_in()`` makes a module with the three names the article's
program takes from torchvision (``datasets.MNIST``, ``transforms.ToTensor``,
``models.resnet18``), so the article's own source runs against real digits unchanged.
"""

from __future__ import annotations

import gzip
import types

import numpy as np
import torch
from torch.utils.data import Dataset

from llmcore.data.corpora import CorpusFile, corpus_path

DIGITS = CorpusFile("optdigits.csv.gz",
                    "09f66e6debdee2cd2b5ae59e0d6abbb73fc2b0e0185d2e1957e9ebb51e23aa22")
# Test images held out by the stand-in MNIST: 7 batches of 64 and a last one of 16,
# as MNIST's 10,000 test images are 156 batches of 64 and a last one of 16.
N_TEST = 7 * 64 + 16
SPLIT_SEED = 0


def load_digits() -> tuple[torch.Tensor, torch.Tensor]:
    """All 1,797 digits: images (N, 8, 8) float32 in [0, 1] (counts / 16), labels (N,)
    int64 in 0..9, in the file's order."""
    with gzip.open(corpus_path(DIGITS), "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.int64)  # (N, 64 pixels + label)
    images = torch.from_numpy(table[:, :64]).float().view(-1, 8, 8) / 16
    return images, torch.from_numpy(table[:, 64])


class DigitsMNIST(Dataset):
    """``torchvision.datasets.MNIST``'s signature over the 8x8 digits: item ``i`` is
    ``(image (1, 8, 8), label)``. A fixed shuffle holds out ``N_TEST`` images for
    ``train=False``; ``root`` and ``download`` are accepted and ignored."""

    def __init__(self, root=None, train=True, download=False, transform=None):
        images, labels = load_digits()
        order = torch.randperm(len(labels),
                               generator=torch.Generator().manual_seed(SPLIT_SEED))
        keep = order[N_TEST:] if train else order[:N_TEST]
        self.data, self.targets = images[keep].unsqueeze(1), labels[keep]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i):
        image = self.data[i]
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self.targets[i])


class ToTensor:
    """``transforms.ToTensor``: MNIST's PIL images become (1, H, W) floats in [0, 1];
    these images are such tensors already, so it passes them through."""

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        return image


def resnet18(*args, **kwargs):
    raise NotImplementedError("the stand-in has no resnet18 (the article imports it "
                              "and never calls it)")


def torchvision_stand_in() -> dict[str, types.ModuleType]:
    """``sys.modules`` entries for a ``torchvision`` whose MNIST is the real 8x8
    digits (``from torchvision.models import ...`` needs the submodule's own entry)."""
    tv = types.ModuleType("torchvision")
    tv.datasets = types.SimpleNamespace(MNIST=DigitsMNIST)
    tv.transforms = types.SimpleNamespace(ToTensor=ToTensor)
    tv.models = types.ModuleType("torchvision.models")
    tv.models.resnet18 = resnet18
    return {"torchvision": tv, "torchvision.models": tv.models}
