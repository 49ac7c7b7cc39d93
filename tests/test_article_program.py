"""The article's program as the book quotes it, and the digits it runs on.

Chapter 21 runs the article's section 5.2 from ``book/article/section-5.2.py``: that
file must be the article's code block character for character (checked against the
article's text where the article is at hand, beside the repository in
``shared/seed/``). The stand-in that serves real digits where the program asks
torchvision for MNIST must keep MNIST's item format and a fixed, disjoint split.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import torch

from book.workers.digits import (N_TEST, DigitsMNIST, load_digits,
                                 torchvision_stand_in)

ROOT = Path(__file__).resolve().parent.parent
QUOTED = ROOT / "book" / "article" / "section-5.2.py"
ARTICLES = [folder / "shared" / "seed" / "000_c7510cca4116fa19.txt"
            for folder in (ROOT.parent, ROOT.parent.parent)]


def code_block(article: str, section: str) -> str:
    """The first ```python block after the heading of ``section`` (e.g. "5.2")."""
    start = re.search(rf"^#+\s*{re.escape(section)}\.", article, re.M).end()
    match = re.compile(r"```python\n(.*?)```", re.S).search(article, start)
    return match.group(1)


def test_the_quoted_program_is_the_articles_verbatim():
    article = next((p for p in ARTICLES if p.is_file()), None)
    if article is None:
        pytest.skip("the article is not beside the repository")
    assert QUOTED.read_text(encoding="utf-8") == code_block(
        article.read_text(encoding="utf-8"), "5.2")


def test_the_quoted_program_parses_and_keeps_its_defects():
    source = QUOTED.read_text(encoding="utf-8")
    compile(source, str(QUOTED), "exec")
    for line in ("embedded = embedded[-1].unsqueeze(0)", "hidden = hidden.data",
                 'print(f"准确率: {correct / len(target) * 100}%")'):
        assert line in source


def test_code_block_finds_the_section():
    text = "## 5.1. a\n```python\nx = 1\n```\n### 5.2. b\ntext\n```python\ny = 2\n```\n"
    assert code_block(text, "5.2") == "y = 2\n"
    assert code_block(text, "5.1") == "x = 1\n"


def test_digits_are_real_and_complete():
    images, labels = load_digits()
    assert images.shape == (1797, 8, 8) and labels.shape == (1797,)
    assert images.min() == 0 and images.max() == 1
    # 16ths: the data set counts "on" pixels 0..16 in each 4x4 block
    assert torch.equal(images * 16, (images * 16).round())
    assert labels.bincount().tolist() == [178, 182, 177, 183, 181, 182, 181, 179, 174,
                                          180]


def test_the_mnist_stand_in_splits_and_serves_like_mnist():
    train, test = DigitsMNIST(train=True), DigitsMNIST(train=False)
    assert len(test) == N_TEST == 7 * 64 + 16 and len(train) + len(test) == 1797
    image, label = test[3]
    assert image.shape == (1, 8, 8) and isinstance(label, int)
    # together the two halves are the data set, each image once
    def items(images, labels):
        return sorted(tuple(x.tolist()) + (int(y),)
                      for x, y in zip(images.flatten(1), labels))

    assert items(torch.cat([train.data, test.data]),
                 torch.cat([train.targets, test.targets])) == items(*load_digits())
    assert torch.equal(DigitsMNIST(train=False).targets, test.targets)  # fixed split


def test_the_stand_in_imports_as_torchvision(monkeypatch):
    for name, module in torchvision_stand_in().items():
        monkeypatch.setitem(sys.modules, name, module)
    namespace = {}
    exec("from torchvision import datasets, transforms\n"
         "from torchvision.models import resnet18\n"
         "data = datasets.MNIST(root='./data', train=False, download=True,"
         " transform=transforms.ToTensor())\n", namespace)
    assert len(namespace["data"]) == N_TEST
    with pytest.raises(NotImplementedError, match="never calls it"):
        namespace["resnet18"]()
