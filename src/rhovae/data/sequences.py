"""Offline sequence datasets of neural-network architectures (and words) and their encoding.

One format for every set: a float32 array ``(N, L, K + F)``. Each step is a one-hot over the ``K`` token
types (the end token among them when the set has one) followed by ``F ∈ {0, 1}`` feature channels in
[0, 1]; padding steps are all-zero rows and come only after the last real step (the end token, when the
set has one, is a real step: it is predicted like any other token).

Three sets, each a function ``(data_dir | None, seed) -> (train, val, test, vocab)`` in
:data:`SEQUENCE_DATASETS`:

- ``nas201``: the NAS-Bench-201 cell space, enumerated: 4 nodes, 6 edges in the order of
  :data:`NAS201_EDGES` ``(1←0), (2←0), (2←1), (3←0), (3←1), (3←2)``, each one of :data:`NAS201_OPS`;
  5⁶ = 15,625 cells of fixed length 6 (K = 5, F = 0, no end token). Valid: 6 operations, and the output
  node 3 connected to the input node 0 by a path with no ``none`` edge (:func:`is_valid_nas201`).
- ``layers``: layer stacks from the grammar in :func:`is_valid_layers` (K = 6 with the end token, F = 1:
  the layer's size as ``log2(size) / 10``, :func:`size_to_feature`), drawn with a seed, de-duplicated.
- ``words``: English words from a dictionary file (Debian's ``wamerican``), as letters a–z plus an end
  token (K = 27, F = 0). Valid: the word is in that dictionary.

Identity of two sequences (uniqueness, novelty) is equality of :func:`to_text`. What a sequence VAE is
scored by (reconstruction accuracy, validity, uniqueness, novelty) is in :mod:`rhovae.sequence_metrics`.
"""

from __future__ import annotations

import functools
import itertools
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from torch import Tensor

from rhovae.errors import RhovaeError

__all__ = [
    "DEFAULT_DICTIONARY",
    "END",
    "LAYER_TOKENS",
    "LETTERS",
    "NAS201_EDGES",
    "NAS201_OPS",
    "SEQUENCE_DATASETS",
    "SequenceVocab",
    "decode",
    "encode",
    "encode_batch",
    "feature_to_size",
    "is_valid_layers",
    "is_valid_nas201",
    "layers_dataset",
    "load_dictionary",
    "nas201_cells",
    "nas201_dataset",
    "nas201_string",
    "parse_nas201",
    "sample_layers",
    "size_to_feature",
    "split_dataset",
    "to_text",
    "words_dataset",
]

END = "<end>"
DEFAULT_DICTIONARY = Path("/usr/share/dict/words")

Array = np.ndarray


@dataclass(frozen=True)
class SequenceVocab:
    """What the columns of a sequence array mean.

    Args:
        name: the dataset (``"nas201"``, ``"layers"``, ``"words"``): it selects the validity rule and the
            text form.
        tokens: the K token names, in column order.
        end: the column of the end token, or None for fixed-length sets.
        n_features: F, the number of feature channels after the one-hot (0 or 1).
        max_len: L, steps per sequence, the end token included.
        source: for ``words``, the dictionary file that defines validity; else None.
    """

    name: str
    tokens: tuple[str, ...]
    end: int | None
    n_features: int
    max_len: int
    source: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "tokens", tuple(self.tokens))
        if self.n_features not in (0, 1):
            raise RhovaeError(f"n_features must be 0 or 1, got {self.n_features}")
        if self.end is not None and not 0 <= self.end < len(self.tokens):
            raise RhovaeError(f"end index {self.end} is outside the {len(self.tokens)} tokens")
        if self.max_len < 1:
            raise RhovaeError(f"max_len must be at least 1, got {self.max_len}")

    @property
    def n_types(self) -> int:
        """K, the one-hot width."""
        return len(self.tokens)

    @property
    def width(self) -> int:
        """K + F, the size of one step."""
        return len(self.tokens) + self.n_features

    @property
    def max_tokens(self) -> int:
        """The most tokens a sequence may have, the end token not counted."""
        return self.max_len - (self.end is not None)

    @functools.cached_property
    def index(self) -> dict[str, int]:
        return {t: i for i, t in enumerate(self.tokens)}

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["tokens"] = list(self.tokens)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SequenceVocab:
        known = {"name", "tokens", "end", "n_features", "max_len", "source"}
        if not isinstance(d, dict) or not {"name", "tokens", "end", "n_features", "max_len"} <= set(d):
            raise RhovaeError("a sequence vocab needs keys name, tokens, end, n_features, max_len")
        if extra := set(d) - known:
            raise RhovaeError(f"unknown sequence vocab keys: {', '.join(sorted(extra))}")
        return cls(**d)


# --- encoding -----------------------------------------------------------------------------------------


def _check_sequence(
    tokens: Sequence[str], features: Sequence[float] | None, vocab: SequenceVocab
) -> list[int]:
    """Token indices with the end token appended (where the set has one); one-line errors otherwise."""
    tokens = list(tokens)
    end_name = vocab.tokens[vocab.end] if vocab.end is not None else None
    if tokens and end_name is not None and tokens[-1] == end_name:
        tokens = tokens[:-1]
    if not tokens:
        raise RhovaeError(f"empty sequence: a {vocab.name} sequence needs at least one token")
    if len(tokens) > vocab.max_tokens:
        extra = " plus the end token" if vocab.end is not None else ""
        raise RhovaeError(
            f"sequence of {len(tokens)} tokens is longer than the limit of {vocab.max_tokens}{extra} "
            f"for {vocab.name}"
        )
    indices = []
    for position, token in enumerate(tokens):
        i = vocab.index.get(token)
        if token == end_name:
            raise RhovaeError(
                f"end token {token!r} at position {position} inside the sequence; it may only come last"
            )
        if i is None:
            raise RhovaeError(
                f"unknown token {token!r} at position {position} for {vocab.name} "
                f"(known: {', '.join(vocab.tokens)})"
            )
        indices.append(i)
    if vocab.n_features:
        if features is None or len(features) != len(tokens):
            got = "none" if features is None else str(len(features))
            raise RhovaeError(
                f"{vocab.name} needs one feature per token: {len(tokens)} tokens, {got} features"
            )
        bad = [f for f in features if not 0.0 <= float(f) <= 1.0]
        if bad:
            raise RhovaeError(f"features must lie in [0, 1]; got {bad[0]!r}")
    elif features is not None and any(True for _ in features):
        raise RhovaeError(f"{vocab.name} has no feature channel; pass features=None")
    if vocab.end is not None:
        indices.append(vocab.end)
    return indices


def encode(tokens: Sequence[str], features: Sequence[float] | None, vocab: SequenceVocab) -> Array:
    """One sequence as ``(L, K + F)`` float32: one-hot types, features, the end step, zero padding.

    ``tokens`` excludes the end token (a trailing one is accepted); ``features`` gives one value in
    [0, 1] per token when F = 1 (the end step's feature is 0), else None.
    """
    indices = _check_sequence(tokens, features, vocab)
    out = np.zeros((vocab.max_len, vocab.width), dtype=np.float32)
    out[np.arange(len(indices)), indices] = 1.0
    if vocab.n_features:
        out[: len(features), vocab.n_types] = np.asarray(features, dtype=np.float32)
    return out


def encode_batch(
    token_lists: Sequence[Sequence[str]],
    feature_lists: Sequence[Sequence[float]] | None,
    vocab: SequenceVocab,
) -> Array:
    """Many sequences as ``(N, L, K + F)`` float32; see :func:`encode`."""
    out = np.zeros((len(token_lists), vocab.max_len, vocab.width), dtype=np.float32)
    for n, tokens in enumerate(token_lists):
        features = feature_lists[n] if feature_lists is not None else None
        indices = _check_sequence(tokens, features, vocab)
        out[n, np.arange(len(indices)), indices] = 1.0
        if vocab.n_features:
            out[n, : len(features), vocab.n_types] = features
    return out


def _as_numpy(x: Array | Tensor) -> Array:
    return x.detach().cpu().numpy() if isinstance(x, Tensor) else np.asarray(x)


def decode(array: Array | Tensor, vocab: SequenceVocab) -> tuple[list[str], list[float] | None]:
    """``(L, K + F)`` back to ``(tokens, features)``: tokens up to (not including) the end token or the
    first padding row, each the argmax of its step's one-hot part; ``features`` None when F = 0."""
    a = _as_numpy(array)
    if a.ndim != 2 or a.shape[1] != vocab.width:
        raise RhovaeError(f"expected an (L, {vocab.width}) array for {vocab.name}, got {a.shape}")
    one_hot = a[:, : vocab.n_types]
    tokens: list[str] = []
    features: list[float] = []
    for t in range(a.shape[0]):
        if one_hot[t].sum() < 0.5:
            break
        k = int(one_hot[t].argmax())
        if k == vocab.end:
            break
        tokens.append(vocab.tokens[k])
        if vocab.n_features:
            features.append(float(a[t, vocab.n_types]))
    return tokens, (features if vocab.n_features else None)


def to_text(array: Array | Tensor, vocab: SequenceVocab) -> str:
    """A person's view of one ``(L, K + F)`` sequence: the word (``words``), the NAS-Bench-201 string
    (``nas201``), or layers such as ``conv64 pool flatten dense128 out10`` (``layers``)."""
    tokens, features = decode(array, vocab)
    if vocab.name == "words":
        return "".join(tokens)
    if vocab.name == "nas201" and len(tokens) == len(NAS201_EDGES):
        return nas201_string(tokens)
    if vocab.name == "layers" and features is not None:
        return " ".join(
            f"{t}{feature_to_size(f)}" if t in SIZED_LAYERS else t
            for t, f in zip(tokens, features, strict=True)
        )
    return " ".join(tokens)


def split_dataset(
    x: Array, seed: int, val_fraction: float = 0.1, test_fraction: float = 0.1
) -> tuple[Array, ...]:
    """A seeded random ``(train, val, test)`` split of the rows of ``x``."""
    if not (0 <= val_fraction and 0 <= test_fraction and val_fraction + test_fraction < 1):
        raise RhovaeError(f"bad split fractions: val {val_fraction}, test {test_fraction}")
    n = len(x)
    order = np.random.default_rng(seed).permutation(n)
    n_val, n_test = round(n * val_fraction), round(n * test_fraction)
    val, test, train = np.split(order, [n_val, n_val + n_test])
    return x[train], x[val], x[test]


# --- nas201 -------------------------------------------------------------------------------------------

NAS201_OPS = ("none", "skip_connect", "nor_conv_1x1", "nor_conv_3x3", "avg_pool_3x3")
#: (to, from) node pairs in sequence order; also the order of the NAS-Bench-201 string.
NAS201_EDGES = ((1, 0), (2, 0), (2, 1), (3, 0), (3, 1), (3, 2))


def nas201_cells() -> list[tuple[str, ...]]:
    """All 5⁶ = 15,625 cells as 6-tuples of operations in :data:`NAS201_EDGES` order."""
    return list(itertools.product(NAS201_OPS, repeat=len(NAS201_EDGES)))


def nas201_string(ops: Sequence[str]) -> str:
    """``|op~0|+|op~0|op~1|+|op~0|op~1|op~2|`` for 6 operations in :data:`NAS201_EDGES` order."""
    if len(ops) != len(NAS201_EDGES):
        raise RhovaeError(f"a NAS-Bench-201 cell has 6 operations, got {len(ops)}")
    nodes = []
    for node in (1, 2, 3):
        parts = [f"{op}~{src}" for op, (dst, src) in zip(ops, NAS201_EDGES, strict=True) if dst == node]
        nodes.append("|" + "|".join(parts) + "|")
    return "+".join(nodes)


def parse_nas201(text: str) -> list[str]:
    """The 6 operations of a NAS-Bench-201 string, in :data:`NAS201_EDGES` order."""
    ops = []
    nodes = text.strip().split("+")
    if len(nodes) != 3:
        raise RhovaeError(f"a NAS-Bench-201 string has 3 nodes separated by '+': {text!r}")
    for node, part in enumerate(nodes, start=1):
        edges = [e for e in part.split("|") if e]
        if not (part.startswith("|") and part.endswith("|")) or len(edges) != node:
            raise RhovaeError(f"node {node} of {text!r} must read |op~0|...|op~{node - 1}|")
        for src, edge in enumerate(edges):
            op, _, got = edge.partition("~")
            if op not in NAS201_OPS:
                raise RhovaeError(f"unknown operation {op!r} in {text!r} (known: {', '.join(NAS201_OPS)})")
            if got != str(src):
                raise RhovaeError(f"edge {edge!r} of node {node} should come from node {src}")
            ops.append(op)
    return ops


def is_valid_nas201(ops: Sequence[str]) -> bool:
    """6 operations, and node 3 reachable from node 0 along edges that are not ``none``.

    Any 6 operations form a cell, but one whose every input-to-output path holds a ``none`` computes
    nothing from its input (degenerate); such cells are counted invalid.
    """
    if len(ops) != len(NAS201_EDGES) or any(op not in NAS201_OPS for op in ops):
        return False
    reached = {0}
    for op, (dst, src) in zip(ops, NAS201_EDGES, strict=True):  # edges come in topological order of dst
        if op != "none" and src in reached:
            reached.add(dst)
    return 3 in reached


def nas201_dataset(
    data_dir: str | Path | None = None, seed: int = 0
) -> tuple[Array, Array, Array, SequenceVocab]:
    """The enumerated cell space, split 80/10/10 with ``seed``; ``data_dir`` is unused (no download)."""
    vocab = SequenceVocab("nas201", NAS201_OPS, end=None, n_features=0, max_len=len(NAS201_EDGES))
    indices = np.array(list(itertools.product(range(len(NAS201_OPS)), repeat=len(NAS201_EDGES))))
    x = np.eye(len(NAS201_OPS), dtype=np.float32)[indices]
    return (*split_dataset(x, seed), vocab)


# --- layers -------------------------------------------------------------------------------------------

LAYER_TOKENS = ("conv", "pool", "flatten", "dense", "out", END)
#: layers whose feature is a size; the others carry feature 0.
SIZED_LAYERS = {"conv": (1, 1024), "dense": (1, 1024), "out": (2, 1024)}
_LAYER_GRAMMAR = re.compile(r"(?:cp?){1,3}fd{0,2}o|d{1,4}o")
_LAYER_LETTER = {"conv": "c", "pool": "p", "flatten": "f", "dense": "d", "out": "o"}
_CONV_CHANNELS = tuple(2**k for k in range(3, 9))  # 8 .. 256
_DENSE_UNITS = tuple(2**k for k in range(4, 11))  # 16 .. 1024
_OUT_CLASSES = (2, 10, 100, 1000)
LAYERS_MAX_LEN = 3 * 2 + 1 + 2 + 1 + 1  # the longest CNN, plus the end token


def size_to_feature(size: float) -> float:
    """A layer size as a feature in [0, 1]: ``log2(size) / 10`` (1 → 0, 1024 → 1)."""
    return math.log2(size) / 10


def feature_to_size(feature: float) -> int:
    """The nearest integer size of a feature: ``round(2 ** (10 f))``, f clipped to [0, 1]."""
    return round(2 ** (10 * min(max(float(feature), 0.0), 1.0)))


def is_valid_layers(tokens: Sequence[str], features: Sequence[float] | None = None) -> bool:
    """Whether a stack follows the grammar (the end token not included in ``tokens``)::

        CNN: (conv [pool]){1..3} flatten dense{0..2} out        MLP: dense{1..4} out

    With ``features``, also: every feature in [0, 1], and the sized layers' sizes
    (:func:`feature_to_size`) within conv 1–1024 channels, dense 1–1024 units, out 2–1024 classes. The
    features of pool and flatten are ignored.
    """
    try:
        letters = "".join(_LAYER_LETTER[t] for t in tokens)
    except KeyError:
        return False
    if not _LAYER_GRAMMAR.fullmatch(letters):
        return False
    if features is None:
        return True
    if len(features) != len(tokens) or any(not -1e-6 <= f <= 1 + 1e-6 for f in features):
        return False
    for token, f in zip(tokens, features, strict=True):
        if token in SIZED_LAYERS:
            low, high = SIZED_LAYERS[token]
            if not low <= feature_to_size(f) <= high:
                return False
    return True


def sample_layers(rng: np.random.Generator) -> tuple[list[str], list[float]]:
    """One stack from the grammar of :func:`is_valid_layers`: CNN or MLP with probability 1/2, block and
    layer counts uniform, conv channels in 8..256, dense units in 16..1024 (powers of two), and
    2, 10, 100 or 1000 classes."""
    tokens: list[str] = []
    sizes: list[float] = []

    def add(token: str, size: float = 1) -> None:
        tokens.append(token)
        sizes.append(size)

    if rng.random() < 0.5:
        for _ in range(rng.integers(1, 4)):
            add("conv", rng.choice(_CONV_CHANNELS))
            if rng.random() < 0.5:
                add("pool")
        add("flatten")
        n_dense = rng.integers(0, 3)
    else:
        n_dense = rng.integers(1, 5)
    for _ in range(n_dense):
        add("dense", rng.choice(_DENSE_UNITS))
    add("out", rng.choice(_OUT_CLASSES))
    return tokens, [size_to_feature(s) for s in sizes]


def layers_dataset(
    data_dir: str | Path | None = None, seed: int = 0, n: int = 10000
) -> tuple[Array, Array, Array, SequenceVocab]:
    """``n`` distinct stacks (:func:`sample_layers`), split 80/10/10; ``data_dir`` is unused."""
    vocab = SequenceVocab(
        "layers", LAYER_TOKENS, end=LAYER_TOKENS.index(END), n_features=1, max_len=LAYERS_MAX_LEN
    )
    rng = np.random.default_rng(seed)
    seen: dict[str, tuple[list[str], list[float]]] = {}
    for _ in range(50 * n):
        if len(seen) == n:
            break
        tokens, features = sample_layers(rng)
        seen.setdefault(
            " ".join(f"{t}{s:.3f}" for t, s in zip(tokens, features, strict=True)), (tokens, features)
        )
    if len(seen) < n:
        raise RhovaeError(f"the layers grammar gave only {len(seen)} distinct stacks; ask for fewer than {n}")
    pairs = list(seen.values())
    x = encode_batch([p[0] for p in pairs], [p[1] for p in pairs], vocab)
    return (*split_dataset(x, seed + 1), vocab)


# --- words --------------------------------------------------------------------------------------------

LETTERS = tuple("abcdefghijklmnopqrstuvwxyz")
_WORD = re.compile(r"[a-z]+")


def load_dictionary(path: str | Path = DEFAULT_DICTIONARY) -> list[str]:
    """The sorted distinct lower-cased words of a dictionary file (one a line) made only of a–z; words
    with apostrophes, accents or other characters after lower-casing are dropped."""
    path = Path(path)
    if not path.is_file():
        raise RhovaeError(
            f"dictionary file {path} not found: install Debian's word list with `apt-get install wamerican` "
            "(it provides /usr/share/dict/words) or pass the path of another one"
        )
    return _read_words(str(path.resolve()), path.stat().st_mtime_ns)


@functools.lru_cache(maxsize=4)
def _read_words(path: str, mtime_ns: int) -> list[str]:
    words = {w.strip().lower() for w in Path(path).read_text(encoding="utf-8", errors="replace").splitlines()}
    words = sorted(w for w in words if _WORD.fullmatch(w))
    if not words:
        raise RhovaeError(f"dictionary file {path} holds no words of letters a-z")
    return words


def words_dataset(
    data_dir: str | Path | None = None,
    seed: int = 0,
    *,
    path: str | Path | None = None,
    max_letters: int = 12,
) -> tuple[Array, Array, Array, SequenceVocab]:
    """Dictionary words of at most ``max_letters`` letters (L = max_letters + 1), split 80/10/10.

    The file is ``path`` if given, else ``data_dir/words`` if ``data_dir`` is given, else
    ``/usr/share/dict/words`` (Debian: ``apt-get install wamerican``).
    """
    if path is None:
        path = Path(data_dir) / "words" if data_dir is not None else DEFAULT_DICTIONARY
    words = [w for w in load_dictionary(path) if len(w) <= max_letters]
    if not words:
        raise RhovaeError(f"dictionary file {path} holds no words of at most {max_letters} letters")
    source = str(Path(path).absolute())
    vocab = SequenceVocab("words", (*LETTERS, END), len(LETTERS), 0, max_letters + 1, source=source)
    lookup = {c: i for i, c in enumerate(LETTERS)}
    x = np.zeros((len(words), vocab.max_len, vocab.width), dtype=np.float32)
    for n, word in enumerate(words):
        x[n, np.arange(len(word)), [lookup[c] for c in word]] = 1.0
        x[n, len(word), vocab.end] = 1.0
    return (*split_dataset(x, seed), vocab)


SEQUENCE_DATASETS: dict[str, Callable[..., tuple[Array, Array, Array, SequenceVocab]]] = {
    "nas201": nas201_dataset,
    "layers": layers_dataset,
    "words": words_dataset,
}
