"""Byte-level text data: a built-in two-domain corpus, user files, a fixed split.

The default corpus needs no download. It is built from files every CPython install has:

- ``code``: the standard library's top-level ``*.py`` modules, in name order, up to a
  byte budget;
- ``prose``: the English help texts stored as strings in ``pydoc_data/topics.py``.

Every source file is recorded with its size and sha256 (:attr:`Corpus.manifest`), so a
run states exactly what it trained on (the files differ between Python versions).

Each domain's bytes are concatenated and cut into non-overlapping windows of
``seq_len + 1`` bytes, and ``val_fraction`` of them are held out for validation, spread
through the whole stream (``val_split="spread"``, the default): the windows are taken in
strata of ``round(1 / val_fraction)`` consecutive windows and one window of each stratum,
at a position fixed by ``split_seed``, goes to validation. Every region of every domain
(every file of a long enough stream) is then represented, so validation is
in-distribution. ``val_split="tail"`` holds out the last ``val_fraction`` of each stream
instead: the end of the alphabetically last code file and the last help topics, a
*domain-shift probe* rather than a fair validation set. Training batches are drawn from a
fresh permutation of the windows per epoch, seeded by ``(seed, epoch)``, so the batch at
any step is a pure function of the config and the *data position* (windows consumed):
resuming needs only that integer.
"""

from __future__ import annotations

import ast
import dataclasses
import hashlib
import os
import pathlib
import sysconfig
from collections.abc import Sequence
from typing import Literal, get_args

import numpy as np

from sigmoid_moe._checks import require_choice, require_int

ValSplit = Literal["spread", "tail"]
VAL_SPLITS: tuple[str, ...] = get_args(ValSplit)

__all__ = [
    "Corpus",
    "DataConfig",
    "build_corpus",
    "default_sources",
    "parse_data_spec",
    "train_batch",
]

TEXT_SUFFIXES = (".txt", ".md", ".rst", ".py", ".json", ".csv", ".html", ".tex", ".c", ".h")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where the text comes from and how it is cut.

    Attributes:
      paths: user text files or folders, each with its domain name as
        ``"domain=path"`` (or a bare path: domain ``"user"``). Empty: built-in corpus.
        One rule for a file named here and the files of a folder: a text file is a
        regular file named with a suffix of :data:`TEXT_SUFFIXES` whose bytes are UTF-8. A
        folder's other files are not data; a file named here that is not text is refused,
        as is a text-named file that does not hold UTF-8 or is not a regular file.
      code_bytes: byte budget of the built-in ``code`` domain.
      prose_bytes: byte budget of the built-in ``prose`` domain.
      val_fraction: share of each domain held out for validation.
      val_split: ``"spread"`` (windows held out all through each domain) or ``"tail"``
        (the end of each domain's stream: a domain-shift probe), see the module docstring.
      split_seed: which window of each stratum is held out (``"spread"``); independent of
        the training seed, so runs of every seed are validated on the same windows.
    """

    paths: tuple[str, ...] = ()
    code_bytes: int = 600_000
    prose_bytes: int = 600_000
    val_fraction: float = 0.05
    val_split: ValSplit = "spread"
    split_seed: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.paths, (str, pathlib.Path)) or not all(
            isinstance(p, (str, pathlib.Path)) for p in self.paths
        ):
            raise TypeError(
                f"paths must be a tuple of strings such as ('prose=books/',), got {self.paths!r}."
            )
        for spec in self.paths:
            parse_data_spec(spec)
        for name in ("code_bytes", "prose_bytes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}.")
        if not (isinstance(self.val_fraction, float) and 0 < self.val_fraction < 0.5):
            raise ValueError(
                f"val_fraction must be a float in (0, 0.5), got {self.val_fraction!r}; e.g. 0.05."
            )
        require_choice("val_split", self.val_split, VAL_SPLITS)
        require_int("split_seed", self.split_seed, 0)


@dataclasses.dataclass(frozen=True)
class Corpus:
    """Windows of ``seq_len + 1`` bytes.

    Attributes:
      train: ``[N_train, seq_len + 1]`` uint8.
      val: ``[N_val, seq_len + 1]`` uint8, domains in order.
      val_domain: ``[N_val]`` int32 index into ``domains``.
      domains: domain names.
      manifest: one dict per source file: ``domain``, ``path``, ``bytes``, ``sha256``.
    """

    train: np.ndarray
    val: np.ndarray
    val_domain: np.ndarray
    domains: tuple[str, ...]
    manifest: tuple[dict, ...]

    def summary(self) -> dict:
        return {
            "train_windows": int(self.train.shape[0]),
            "val_windows": int(self.val.shape[0]),
            "window": int(self.train.shape[1]),
            "domains": list(self.domains),
            "files": list(self.manifest),
        }


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _prose_from_topics(path: pathlib.Path) -> bytes:
    """The string values of the ``topics`` dict in ``pydoc_data/topics.py``, key order."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "topics" for t in node.targets
        ):
            topics = ast.literal_eval(node.value)
            return "\n\n".join(topics[k] for k in sorted(topics)).encode("utf-8")
    raise ValueError(f"{path} has no 'topics' dict; cannot build the prose domain.")


def default_sources(code_bytes: int, prose_bytes: int) -> list[tuple[str, str, bytes]]:
    """``(domain, path, text)`` of the built-in corpus (see the module docstring)."""
    stdlib = pathlib.Path(sysconfig.get_paths()["stdlib"])
    sources, used = [], 0
    for path in sorted(stdlib.glob("*.py")):
        if used >= code_bytes:
            break
        data = path.read_bytes()[: code_bytes - used]
        sources.append(("code", str(path), data))
        used += len(data)
    topics = stdlib / "pydoc_data" / "topics.py"
    if not topics.is_file():
        raise FileNotFoundError(f"{topics} is missing; pass your own text with --data.")
    sources.append(("prose", str(topics), _prose_from_topics(topics)[:prose_bytes]))
    return sources


def parse_data_spec(spec: str | pathlib.Path) -> tuple[str, pathlib.Path]:
    """``"DOMAIN=PATH"`` (or a bare ``"PATH"``: domain ``"user"``) as ``(domain, path)``;
    ``ValueError`` for an empty domain or path."""
    text = str(spec)
    domain, sep, raw = text.partition("=")
    if not sep:
        domain, raw = "user", text
    if not raw.strip():
        raise ValueError(
            f"data path {text!r} is empty; pass a text file or folder as PATH or DOMAIN=PATH, "
            "e.g. prose=books/."
        )
    if not domain.strip():
        raise ValueError(f"data path {text!r} has an empty domain; e.g. prose={raw}.")
    return domain, pathlib.Path(raw).expanduser()


def _text_files(path: pathlib.Path) -> list[pathlib.Path]:
    """The text files under folder ``path``, sorted: every file named with a text suffix
    (:data:`TEXT_SUFFIXES`); an unreadable subfolder, or such a name that is not a regular
    file (a FIFO, a device), is an error."""

    def fail(err: OSError) -> None:
        raise type(err)(f"data folder {err.filename!r} cannot be listed ({err.strerror}).")

    found = []
    for root, _, names in os.walk(path, onerror=fail):
        found += [pathlib.Path(root, n) for n in names if pathlib.Path(n).suffix in TEXT_SUFFIXES]
    for file in found:
        _require_regular(file)
    return sorted(found)


def _require_regular(path: pathlib.Path) -> None:
    """Only regular files are read: a FIFO would block the read forever, a device never end."""
    if not path.is_file():
        raise ValueError(
            f"data path {str(path)!r} is not a regular file or a folder (a FIFO, socket or "
            "device?); pass text files or folders."
        )


def _read(path: pathlib.Path) -> bytes:
    """The bytes of a data file, which must be text: a text suffix and UTF-8 (the one rule
    for a file given by name and for the files of a folder)."""
    try:
        data = path.read_bytes()
    except OSError as err:
        raise type(err)(f"data file {str(path)!r} cannot be read ({err.strerror}).") from None
    if path.suffix not in TEXT_SUFFIXES:
        suffix = f"suffix {path.suffix!r}" if path.suffix else "no suffix"
        raise ValueError(
            f"data file {str(path)!r} is not named as a text file ({suffix}); text files "
            f"end in {', '.join(TEXT_SUFFIXES)}."
        )
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(
            f"data file {str(path)!r} is not UTF-8 text (byte {err.start} is "
            f"{data[err.start : err.start + 1]!r}); pass text files."
        ) from None
    return data


def _user_sources(paths: Sequence[str]) -> list[tuple[str, str, bytes]]:
    sources = []
    for spec in paths:
        domain, path = parse_data_spec(spec)
        try:
            exists = path.exists()
        except OSError as err:  # e.g. a name too long
            raise type(err)(f"data path {str(path)!r} cannot be read ({err.strerror}).") from None
        if not exists:
            raise FileNotFoundError(
                f"data path {str(path)!r} does not exist; pass existing text files or folders "
                "(as PATH or DOMAIN=PATH), or leave --data out for the built-in corpus."
            )
        if path.is_dir():
            files = _text_files(path)
        else:
            _require_regular(path)
            files = [path]
        if not files:
            raise ValueError(f"folder {str(path)!r} holds no text file ({TEXT_SUFFIXES}).")
        sources.extend((domain, str(f), _read(f)) for f in files)
    return sources


def _windows(data: bytes, width: int) -> np.ndarray:
    n = len(data) // width
    return np.frombuffer(data[: n * width], np.uint8).reshape(n, width)


def val_window_mask(num_windows: int, config: DataConfig, domain_index: int) -> np.ndarray:
    """``[num_windows]`` bool: which of a domain's windows are held out for validation."""
    held = np.zeros(num_windows, bool)
    if config.val_split == "tail":
        cut = num_windows - int(round(num_windows * config.val_fraction))
        held[cut:] = True
        return held
    stride = max(2, int(round(1 / config.val_fraction)))
    strata = -(-num_windows // stride)
    rng = np.random.default_rng([config.split_seed, domain_index])
    pick = np.arange(strata) * stride + rng.integers(0, stride, size=strata)
    held[pick[pick < num_windows]] = True
    return held


def _split(windows: np.ndarray, config: DataConfig, domain_index: int):
    held = val_window_mask(len(windows), config, domain_index)
    return windows[~held], windows[held]


def build_corpus(config: DataConfig, seq_len: int) -> Corpus:
    """Reads the sources and cuts them into train/validation windows (deterministic)."""
    if not isinstance(config, DataConfig):
        raise TypeError(f"config must be a DataConfig, got {type(config).__name__}.")
    if config.paths:
        sources = _user_sources(config.paths)
    else:
        sources = default_sources(config.code_bytes, config.prose_bytes)
    domains = tuple(dict.fromkeys(domain for domain, _, _ in sources))
    width = seq_len + 1
    train, val, val_domain = [], [], []
    for index, domain in enumerate(domains):
        data = b"\n".join(text for d, _, text in sources if d == domain)
        train_w, val_w = _split(_windows(data, width), config, index)
        if len(train_w) < 1 or len(val_w) < 1:
            raise ValueError(
                f"domain {domain!r} has {len(data)} bytes, too few for one training and one "
                f"validation window of {width} bytes; add text or lower seq_len."
            )
        train.append(train_w)
        val.append(val_w)
        val_domain.append(np.full(len(val_w), index, np.int32))
    manifest = tuple(
        {"domain": d, "path": p, "bytes": len(t), "sha256": _sha256(t)} for d, p, t in sources
    )
    return Corpus(
        train=np.concatenate(train),
        val=np.concatenate(val),
        val_domain=np.concatenate(val_domain),
        domains=domains,
        manifest=manifest,
    )


def train_batch(corpus: Corpus, position: int, batch_size: int, seed: int) -> np.ndarray:
    """The ``[batch_size, seq_len + 1]`` uint8 batch starting at data ``position``.

    Window ``position + i`` of the endless stream that visits the training windows in a
    permutation seeded by ``(seed, epoch)`` per epoch.
    """
    n = corpus.train.shape[0]
    rows = []
    for p in range(position, position + batch_size):
        epoch, offset = divmod(p, n)
        perm = _permutation(n, seed, epoch)
        rows.append(perm[offset])
    return corpus.train[np.asarray(rows)]


_PERM_CACHE: dict[tuple[int, int, int], np.ndarray] = {}


def _permutation(n: int, seed: int, epoch: int) -> np.ndarray:
    key = (n, seed, epoch)
    if key not in _PERM_CACHE:
        if len(_PERM_CACHE) > 8:
            _PERM_CACHE.clear()
        _PERM_CACHE[key] = np.random.default_rng([seed, epoch]).permutation(n)
    return _PERM_CACHE[key]
