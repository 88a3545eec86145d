"""The text: the ``.py`` sources of the running Python's standard library, as bytes.

Every Python ships them, so nothing is downloaded and nobody here wrote them. The files are split
into training and held-out files by a hash of their path relative to the library's root (about
10% held out), so the split is the same on every machine and no file is in both. The exact text
depends on the Python build; ``Corpus.digest`` (SHA-256 over the sorted paths and contents) and
``Corpus.python`` are recorded with every result so that a reader knows what was trained on.
"""

from __future__ import annotations

import functools
import hashlib
import math
import platform
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from gradstab.experiment.model import VOCAB_SIZE

HELDOUT_FRACTION = 0.1
# Third-party packages installed into the library's directory are not the standard library.
EXCLUDED_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__"})


def is_heldout(relative_path: str, fraction: float = HELDOUT_FRACTION) -> bool:
    """Whether a file (its path relative to the library's root, with ``/``) is held out."""
    digest = hashlib.sha256(relative_path.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") < fraction * 2**64


@dataclass(frozen=True)
class Corpus:
    train: Tensor  # uint8, the training files' bytes one after another
    heldout: Tensor  # uint8, the held-out files'
    train_counts: Tensor  # int64 [256]: how often each byte occurs in ``train``
    train_files: int
    heldout_files: int
    root: str
    python: str
    digest: str

    def describe(self) -> dict[str, object]:
        """What a result records about the text."""
        return {
            "source": "Python standard library *.py",
            "python": self.python,
            "root": self.root,
            "sha256": self.digest,
            "train_files": self.train_files,
            "train_bytes": len(self.train),
            "heldout_files": self.heldout_files,
            "heldout_bytes": len(self.heldout),
        }


def stdlib_files(root: Path) -> list[Path]:
    """The ``.py`` files under ``root`` outside ``EXCLUDED_DIRS``, sorted by relative path."""
    files = [
        p
        for p in root.rglob("*.py")
        if p.is_file() and not EXCLUDED_DIRS.intersection(p.relative_to(root).parts)
    ]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


@functools.lru_cache(maxsize=2)
def load_corpus(root: str | None = None) -> Corpus:
    """Reads and splits the standard library's sources (``root`` defaults to this Python's)."""
    base = Path(root or sysconfig.get_paths()["stdlib"])
    files = stdlib_files(base)
    if not files:
        raise FileNotFoundError(
            f"gradstab experiment: it trains on Python's standard-library sources, but there is "
            f"no .py file under {base} (a Python installed without its sources?)"
        )
    digest = hashlib.sha256()
    parts: dict[bool, list[bytes]] = {False: [], True: []}
    for path in files:
        relative = path.relative_to(base).as_posix()
        data = path.read_bytes()
        digest.update(relative.encode("utf-8") + b"\0" + len(data).to_bytes(8, "big") + data)
        parts[is_heldout(relative)].append(data)
    if not parts[True] or not parts[False]:
        raise FileNotFoundError(f"gradstab experiment: too few source files under {base}")

    def join(chunks: list[bytes]) -> Tensor:
        return torch.frombuffer(bytearray(b"".join(chunks)), dtype=torch.uint8)

    train = join(parts[False])
    return Corpus(
        train=train,
        heldout=join(parts[True]),
        train_counts=torch.bincount(train, minlength=VOCAB_SIZE),
        train_files=len(parts[False]),
        heldout_files=len(parts[True]),
        root=str(base),
        python=platform.python_version(),
        digest=digest.hexdigest(),
    )


def sequences(data: Tensor, starts: Tensor, length: int) -> Tensor:
    """``[len(starts), length]`` int64 windows of ``data`` beginning at ``starts``."""
    return data[starts[:, None] + torch.arange(length)].long()


def random_windows(data: Tensor, count: int, length: int, generator: torch.Generator) -> Tensor:
    """``count`` windows of ``length`` bytes at uniformly random offsets."""
    starts = torch.randint(len(data) - length + 1, (count,), generator=generator)
    return sequences(data, starts, length)


def unigram_loss(counts: Tensor, targets: Tensor) -> float:
    """Cross-entropy (nats/byte) on ``targets`` of the byte frequencies ``counts`` (add-one
    smoothed): the loss of a model that knows how often each byte occurs, nothing more."""
    smoothed = counts.double() + 1
    log_p = (smoothed / smoothed.sum()).log()
    return -log_p[targets.flatten()].mean().item()


UNIFORM_LOSS = math.log(VOCAB_SIZE)  # every byte equally likely: ln 256 = 5.545 nats
