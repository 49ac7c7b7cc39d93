"""The vendored corpora, checked against their SHA-256 before use.

Nothing is downloaded at run time: the files live in the repository's ``data/`` folder
(see ``data/README.md`` for their provenance and terms). A missing or altered file is
an error that names the file and the fix, never a silently different experiment.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

DATA_DIR = Path(__file__).resolve().parents[2] / "data"


@dataclass(frozen=True)
class CorpusFile:
    name: str  # file name inside the data folder
    sha256: str  # expected digest of the file's bytes


CORPORA: dict[str, tuple[CorpusFile, ...]] = {
    "shakespeare": (CorpusFile(
        "tinyshakespeare.txt",
        "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"),),
    "polarity": (
        CorpusFile("rt-polarity.pos",
                   "4134882974a28d0c7b5151256f0e33a6169984ee7372c279e673f1114f475d58"),
        CorpusFile("rt-polarity.neg",
                   "2d11cfbc790f1cd96d78339f41ce53ced1efa83cd22d37d6788fa3fe3d17e2fd"),
    ),
}


class CorpusError(RuntimeError):
    """A vendored corpus file is missing or does not have the expected contents."""


def corpus_path(file: CorpusFile, data_dir: Path | str | None = None) -> Path:
    """The verified path of one corpus file."""
    folder = Path(data_dir) if data_dir is not None else DATA_DIR
    path = folder / file.name
    if not path.is_file():
        raise CorpusError(
            f"corpus file {path} is missing. It is part of the repository: restore it "
            f"with `git checkout -- data/{file.name}`, or pass data_dir= the folder "
            "that holds it.")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != file.sha256:
        raise CorpusError(
            f"corpus file {path} is corrupt or altered: its SHA-256 is {digest}, "
            f"expected {file.sha256}. Restore it with "
            f"`git checkout -- data/{file.name}` "
            "(see data/README.md for its source).")
    return path


def load_corpus(name: str, data_dir: Path | str | None = None):
    """The text of a vendored corpus, after checking its SHA-256.

    ``"shakespeare"``: one string, the whole tiny-shakespeare corpus.
    ``"polarity"``: ``(sentences, labels)``, two lists in file order, positive
    sentences (label 1) first, then negative ones (label 0).
    """
    if name not in CORPORA:
        raise ValueError(f"name={name!r} is not a vendored corpus; "
                         f"choose one of {sorted(CORPORA)}")
    paths = [corpus_path(f, data_dir) for f in CORPORA[name]]
    if name == "shakespeare":
        return paths[0].read_text(encoding="utf-8")
    sentences, labels = [], []
    for path, label in zip(paths, (1, 0)):
        lines = path.read_text(encoding="utf-8").splitlines()
        lines = [line.strip() for line in lines if line.strip()]
        sentences += lines
        labels += [label] * len(lines)
    return sentences, labels
