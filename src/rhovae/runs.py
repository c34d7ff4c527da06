"""The run folder: config, atomic and locked checkpoints, device choice, the run's data, ``load_run``.

A run folder holds ``config.toml`` (the resolved settings), ``metrics.csv``, ``last.pt`` (every epoch),
``best.pt`` (on validation improvement), pictures, and while a process trains in it a ``.lock``.
Checkpoints hold tensors and plain data only (``torch.load(weights_only=True)`` reads them): no code
is ever executed from a checkpoint. Everything that reads or writes a run folder lives here, below
both the trainer and the evaluator.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import logging
import os
import platform
import re
import stat
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

import rhovae
from rhovae.config import PYTHON_DATA, RESUMABLE_FIELDS, RunConfig, from_dict, load_config
from rhovae.data import Data, Preprocessing, RawSplits, load_data
from rhovae.errors import RhovaeError
from rhovae.files import is_regular_file, require_regular_file  # noqa: F401 - re-exported
from rhovae.likelihoods import LIKELIHOODS
from rhovae.model import FRAME_MODELS, MODELS, VAE, build_model

log = logging.getLogger(__name__)

__all__ = [
    "CHECKPOINT_FORMAT",
    "RunInUse",
    "RunLock",
    "check_run_dir",
    "data_fingerprint",
    "remove_run_files",
    "load_checkpoint",
    "load_run",
    "pick_device",
    "prepare_data",
    "save_atomic",
    "write_text_atomic",
]

CHECKPOINT_FORMAT = 2
# what every checkpoint holds (last.pt adds the optimiser, scheduler, RNG and history)
CHECKPOINT_KEYS = ("format", "config", "data_shape", "preprocessing", "epoch", "model")
RESUME_KEYS = ("optimizer", "scheduler", "rng", "history", "best_val", "best_epoch", "stale")


def progress_bar(total: int, desc: str, enabled: bool):
    """A tqdm bar on stderr (None when disabled or tqdm is missing); callers ``update`` and ``close``."""
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True)


def pick_device(name: str) -> torch.device:
    """``auto`` picks cuda, then mps, then cpu; anything else must be a device this machine has."""
    mps = getattr(torch.backends, "mps", None)
    mps_ok = mps is not None and mps.is_available()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps") if mps_ok else torch.device("cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise RhovaeError(f"unknown device {name!r}; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise RhovaeError(f"device {name!r} requested but CUDA is not available; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise RhovaeError(f"device {name!r}: this machine has {torch.cuda.device_count()} CUDA devices")
    elif device.type == "mps" and not mps_ok:
        raise RhovaeError(f"device {name!r} requested but MPS is not available; use --device cpu")
    elif device.type != "cpu":
        raise RhovaeError(f"device {name!r} cannot train a model; use auto, cpu, cuda, cuda:N or mps")
    return device


def versions() -> dict[str, str]:
    return {
        "rhovae": rhovae.__version__,
        "torch": str(torch.__version__),
        "python": platform.python_version(),
    }


# --- atomic writes ----------------------------------------------------------------------------------


def _write_failed(path: Path, e: OSError) -> RhovaeError:
    reason = {errno.ENOSPC: "the disk is full", errno.EROFS: "the file system is read-only"}.get(
        e.errno or 0, e.strerror or type(e).__name__
    )
    return RhovaeError(f"cannot write {path}: {reason}; free space or choose a writable --run-dir")


@functools.lru_cache(maxsize=1)
def _file_mode() -> int:
    """The mode a plain ``open()`` would give a new file (0o666 less the umask); mkstemp's is 0o600."""
    try:  # Linux says it without changing it
        with open("/proc/self/status") as f:
            umask = next(int(line.split()[1], 8) for line in f if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError, IndexError):
        umask = os.umask(0o022)
        os.umask(umask)
    return 0o666 & ~umask


class _Recording:
    """A file whose ``write`` keeps the OSError it raised: ``torch.save`` replaces that error by a
    RuntimeError ("unexpected pos ..."), which would hide a full disk behind an internal error."""

    def __init__(self, f: Any) -> None:
        self._f = f
        self.error: OSError | None = None

    def write(self, data: Any) -> int:
        try:
            return self._f.write(data)
        except OSError as e:
            self.error = e
            raise

    def __getattr__(self, name: str) -> Any:
        return getattr(self._f, name)


# every temporary file rhovae writes beside its target is named ".rhovae-tmp.NAME.XXXXXXXX[.SUFFIX]"
# (XXXXXXXX: mkstemp's random part): a name only rhovae makes, so the sweep of a locked run folder
# (files a killed writer left) can never match a user's own file
TEMPORARY_PREFIX = ".rhovae-tmp."
_TEMPORARY = re.compile(r"^\.rhovae-tmp\.(?P<target>.+)\.[a-z0-9_]{8}(\.[A-Za-z0-9]{1,8})?$")


def temporary_beside(path: Path, suffix: str = ".tmp") -> tuple[int, str]:
    """A new, uniquely named temporary file beside ``path`` (``mkstemp``'s ``(fd, name)``), named so
    that :func:`_remove_temporaries` recognises it; OSError as ``mkstemp`` raises it."""
    return tempfile.mkstemp(prefix=f"{TEMPORARY_PREFIX}{path.name}.", suffix=suffix, dir=path.parent)


def _atomic(path: Path, write: Callable[[Any], None], mode: str = "wb") -> None:
    """Write to a uniquely named temporary file beside ``path``, fsync, then rename over ``path``.

    A reader sees the old file or the new one, never a torn one; two writers never share a temporary
    name; on any failure (a full or read-only disk, an interrupt) the temporary file is removed and the
    old ``path`` stays. The new file gets the permissions a plain ``open`` would give it.
    """
    path = Path(path)
    try:
        fd, tmp = temporary_beside(path)
    except OSError as e:
        raise _write_failed(path, e) from None
    f = None
    try:
        with os.fdopen(fd, mode) as raw:
            f = _Recording(raw)
            write(f)
            raw.flush()
            os.fsync(raw.fileno())
        with contextlib.suppress(OSError):  # some file systems have no modes; the data matters more
            os.chmod(tmp, _file_mode())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(e, OSError):
            raise _write_failed(path, e) from None
        if f is not None and f.error is not None:
            raise _write_failed(path, f.error) from None
        if isinstance(e, RuntimeError) and "write" in str(e).lower():  # torch's zip writer on a full disk
            raise RhovaeError(f"cannot write {path}: {str(e).splitlines()[0]}; free space") from None
        raise


def save_atomic(obj: Any, path: Path) -> None:
    """``torch.save`` atomically (see :func:`_atomic`)."""
    _atomic(path, lambda f: torch.save(obj, f))


def write_text_atomic(path: Path, text: str) -> None:
    _atomic(path, lambda f: f.write(text), mode="w")


# --- locking ----------------------------------------------------------------------------------------


class RunInUse(RhovaeError):
    """Another process holds the run folder's lock."""


# the run folders this process holds, so that a holder may enter the lock again (``rhovae compare``
# holds a run's folder across training and evaluation; training takes the same lock inside)
_HELD: dict[str, tuple[tuple[int, int], int, Any]] = {}  # folder -> ((pid, thread), depth, lock file)
_HELD_GUARD = threading.Lock()


class RunLock:
    """An advisory lock on a run folder (``fcntl.flock`` on ``RUN/.lock``) for as long as a process
    trains in it. A second writer gets a clear refusal (:class:`RunInUse`); the lock of a process that
    died is released by the operating system, so it is taken over without any stale-file cleanup. The
    thread holding it may enter it again. On taking it, temporary files that a killed writer left in the
    folder are removed. Elsewhere than POSIX it is a no-op."""

    def __init__(self, run_dir: Path) -> None:
        self.path = Path(run_dir) / ".lock"
        self._key = os.path.realpath(run_dir)
        self._file = None

    def __enter__(self) -> RunLock:
        try:
            import fcntl
        except ImportError:  # pragma: no cover - not POSIX
            return self
        with _HELD_GUARD:
            held = _HELD.get(self._key)
            if held is not None and held[0][0] != os.getpid():  # inherited by a fork: not ours
                del _HELD[self._key]
                held = None
            if held is not None:
                owner, depth, file = held
                if owner != _holder():
                    raise RunInUse(f"{self.path.parent} is in use by another thread of this process")
                _HELD[self._key] = (owner, depth + 1, file)
                return self
            file = _open_lock_file(self.path)
            try:
                fcntl.flock(file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                pid = ""
                with contextlib.suppress(OSError, ValueError):
                    file.seek(0)
                    pid = file.read(32).strip()
                file.close()
                raise RunInUse(
                    f"{self.path.parent} is in use by another rhovae process"
                    + (f" (pid {pid})" if pid.isdigit() else "")
                    + "; wait for it or choose another --run-dir"
                ) from None
            with contextlib.suppress(OSError):  # the pid is for people; the flock is the lock
                file.seek(0)
                file.truncate()
                file.write(f"{os.getpid()}\n")
                file.flush()
            _HELD[self._key] = (_holder(), 1, file)
        self._file = file
        if is_rhovae_folder(self.path.parent):  # never touch a folder that is not a run
            _remove_temporaries(self.path.parent)
        return self

    def __exit__(self, *exc: object) -> None:
        with _HELD_GUARD:
            held = _HELD.get(self._key)
            if held is None:
                return
            owner, depth, file = held
            if depth > 1:
                _HELD[self._key] = (owner, depth - 1, file)
                return
            del _HELD[self._key]
            file.close()  # closing releases the flock
            self._file = None


def _open_lock_file(path: Path):
    """Open (or create) the lock file itself: never through a symlink (an unpacked or shared run folder
    may hold one pointing anywhere; following it would truncate its target), and only a regular file
    (O_NONBLOCK: a FIFO planted there cannot block the open)."""
    flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
    try:
        fd = os.open(path, flags | getattr(os, "O_CLOEXEC", 0), _file_mode())
    except OSError as e:
        if e.errno == errno.ELOOP or path.is_symlink():
            raise RhovaeError(
                f"{path} is a symbolic link; rhovae locks only its own file: remove the link and retry"
            ) from None
        raise _write_failed(path, e) from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise RhovaeError(f"{path} is not a regular file; remove it and retry (rhovae recreates it)")
    with contextlib.suppress(OSError):
        os.set_blocking(fd, True)
    return os.fdopen(fd, "r+")


def is_rhovae_folder(folder: Path) -> bool:
    """Whether ``folder`` is rhovae's: it holds a ``config.toml``, or nothing but a lock file and
    rhovae's own temporary files (a run killed before its first write landed)."""
    try:
        names = [p.name for p in Path(folder).iterdir()]
    except OSError:
        return False
    if "config.toml" in names:
        return _is_rhovae_config(Path(folder) / "config.toml")
    return all(n == ".lock" or _TEMPORARY.match(n) for n in names)


def _is_rhovae_config(path: Path) -> bool:
    """Whether ``path`` is a config.toml rhovae wrote (its first line), not a user's file of that name."""
    try:
        with open(path, "rb") as f:
            return f.read(len(CONFIG_HEADER)) == CONFIG_HEADER
    except OSError:
        return False


#: the first line of every config.toml rhovae writes (rhovae.config.to_toml)
CONFIG_HEADER = b"# rhovae run configuration"


def _holder() -> tuple[int, int]:
    return os.getpid(), threading.get_ident()


def _remove_temporaries(run_dir: Path) -> None:
    """Delete the temporary files of writers killed in ``run_dir`` (only its lock holder may)."""
    with contextlib.suppress(OSError):
        for p in run_dir.iterdir():
            if _TEMPORARY.match(p.name) and p.is_file():
                with contextlib.suppress(OSError):
                    p.unlink()
                    log.info("removed %s, left by an interrupted write", p)


# --- reading a run ----------------------------------------------------------------------------------


def load_checkpoint(path: Path, resume: bool = False) -> dict[str, Any]:
    """A rhovae checkpoint's contents, validated; any problem is one RhovaeError naming the file."""
    path = Path(path)
    try:
        require_regular_file(path, "a checkpoint")
    except (FileNotFoundError, IsADirectoryError):
        pass  # said below, as torch.load meets them
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise RhovaeError(f"{path}: no checkpoint here; train first (rhovae train --run-dir ...)") from None
    except IsADirectoryError:
        raise RhovaeError(f"{path}: is a folder, not a checkpoint") from None
    except Exception as e:  # noqa: BLE001 - any unpickling failure is a corrupt file to the user
        raise RhovaeError(f"{path}: unreadable checkpoint ({type(e).__name__}); it may be corrupt") from None
    found = ckpt.get("format") if isinstance(ckpt, dict) else None
    if type(found) is not int or found != CHECKPOINT_FORMAT:
        raise RhovaeError(
            f"{path}: not a rhovae checkpoint of format {CHECKPOINT_FORMAT} (found {_short(found)}); "
            "retrain with this version"
        )
    missing = [k for k in CHECKPOINT_KEYS + (RESUME_KEYS if resume else ()) if k not in ckpt]
    if missing:
        raise RhovaeError(f"{path}: checkpoint lacks {', '.join(missing)}; it is damaged, retrain")
    damaged = [k for k, ok in _ENTRY_CHECKS.items() if k in ckpt and not ok(ckpt[k])]
    if damaged:
        raise RhovaeError(f"{path}: checkpoint entry {', '.join(damaged)} is damaged; retrain")
    return ckpt


def _short(value: Any, width: int = 40) -> str:
    text = repr(value).replace("\n", " ")
    return text if len(text) <= width else text[: width - 3] + "..."


def _is_count(v: Any) -> bool:
    return type(v) is int and v >= 0


# what each entry must be, so that a damaged (or hand-made) checkpoint fails here, in one line, and not
# deep inside the model or optimiser
_ENTRY_CHECKS: dict[str, Callable[[Any], bool]] = {
    "config": lambda v: (  # RunConfig fields are plain values
        isinstance(v, dict)
        and all(isinstance(k, str) and isinstance(x, (bool, int, float, str)) for k, x in v.items())
    ),
    "data_shape": lambda v: (
        isinstance(v, (list, tuple)) and 0 < len(v) <= 8 and all(_is_count(n) and n > 0 for n in v)
    ),
    "preprocessing": lambda v: isinstance(v, dict),
    "data_meta": lambda v: v is None or isinstance(v, dict),
    "epoch": _is_count,
    "model": lambda v: isinstance(v, dict) and all(isinstance(k, str) for k in v),
    "optimizer": lambda v: isinstance(v, dict),
    "scheduler": lambda v: isinstance(v, dict),
    "rng": lambda v: (
        isinstance(v, dict)
        and all(isinstance(v.get(k), torch.Tensor) for k in ("torch", "shuffle", "pixels"))
    ),
    "history": lambda v: isinstance(v, list) and all(isinstance(row, dict) for row in v),
    "best_val": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    "best_epoch": _is_count,
    "stale": _is_count,
}


# what rhovae writes in a run folder: what --overwrite removes (nothing else is ever touched)
RUN_FILES = (
    "config.toml", "metrics.csv", "last.pt", "best.pt", "evaluation.json", "samples.png",
    "reconstructions.png", "loss_curves.png", "samples.txt", "reconstructions.txt", "samples.pt",
    "mlflow.json",
)  # fmt: skip
RUN_FOLDERS = ("tensorboard", "explore")


def check_run_dir(
    run_dir: Path, cfg: RunConfig, resume: bool, overwrite: bool = False
) -> dict[str, Any] | None:
    """Refuse to mix runs; return the checkpoint to resume from, if any.

    A folder holding only a ``config.toml`` of a run that never finished an epoch (killed or failed in
    its first epoch) is a fresh start: with the same settings it is retried, with other settings it is
    replaced, since there is nothing to lose. A folder holding a ``best.pt`` or a ``last.pt`` is a run:
    it is continued (``resume``) or replaced (``overwrite``, which removes rhovae's files and nothing
    else), never silently written over. A folder that is not rhovae's is never touched.
    """
    config_file = run_dir / "config.toml"
    last = run_dir / "last.pt"
    if run_dir.is_file():
        raise RhovaeError(f"{run_dir}: is a file; choose a folder for --run-dir")
    if run_dir.exists() and not is_rhovae_folder(run_dir):
        raise RhovaeError(f"{run_dir}: folder is not empty and holds no rhovae run; choose another --run-dir")
    if not config_file.exists():
        if resume:
            raise RhovaeError(
                f"{run_dir}: nothing to resume (no config.toml); drop --resume to start a new run"
            )
        return None
    if overwrite:
        return None  # the caller removes the old run's files once the new run is built
    if not last.exists():
        if (run_dir / "best.pt").exists():  # rhovae writes last.pt first: this run's last.pt was removed
            raise RhovaeError(
                f"{run_dir} holds a trained run (best.pt) without its last.pt, so it cannot be resumed; "
                "pass --overwrite to replace it, or choose another --run-dir"
            )
        return None  # no finished epoch: nothing to resume and nothing to lose
    saved = load_config(config_file)
    new, old = cfg.to_dict(), saved.to_dict()
    differ = [k for k, v in new.items() if k not in RESUMABLE_FIELDS and old.get(k) != v]
    if differ:
        details = ", ".join(f"{k}: {old.get(k)!r} -> {new[k]!r}" for k in differ)
        raise RhovaeError(
            f"{run_dir} holds a different run ({details}); choose another --run-dir (or --overwrite it)"
        )
    if not resume:
        raise RhovaeError(
            f"{run_dir} already holds this run; pass --resume to continue it, --overwrite to replace it, "
            "or another --run-dir"
        )
    ckpt = load_checkpoint(last, resume=True)
    if from_dict(ckpt["config"]).to_dict() | {k: new[k] for k in RESUMABLE_FIELDS} != new:
        raise RhovaeError(f"{last} belongs to another run than {config_file}; start a new --run-dir")
    return ckpt


def remove_run_files(run_dir: Path) -> None:
    """Remove what rhovae wrote in ``run_dir`` (:data:`RUN_FILES`, :data:`RUN_FOLDERS`), nothing else."""
    import shutil

    for name in RUN_FILES:
        with contextlib.suppress(FileNotFoundError):
            (run_dir / name).unlink()
    for name in RUN_FOLDERS:
        folder = run_dir / name
        if folder.is_dir() and not folder.is_symlink():
            shutil.rmtree(folder)
    log.info("%s: the previous run's files were removed (--overwrite)", run_dir)


def data_fingerprint(split: Any, rows: int = 256) -> str:
    """A fingerprint of a training split: its shape and a hash of up to ``rows`` evenly spaced examples
    (cheap for any size, memory-mapped included). ``last.pt`` records it, so a run is never resumed on
    other data than it was trained on."""
    import hashlib

    n = len(split)
    picks = sorted({round(i * (n - 1) / max(1, rows - 1)) for i in range(min(n, rows))})
    sample = split[torch.tensor(picks, dtype=torch.long)] if picks else split[:0]
    h = hashlib.sha256(repr((n, tuple(split.shape[1:]))).encode())
    # rounded: a resume on another device may prepare (resize) the same rows with last-bit differences
    values = sample.detach().to("cpu", torch.float32).contiguous().numpy().round(4)
    h.update(values.tobytes())
    return h.hexdigest()[:32]


def prepare_data(cfg: RunConfig, device: torch.device, raw: RawSplits | None = None) -> Data:
    """The run's data on ``device``, shaped as its model takes it; ``raw``: arrays handed over from
    Python (``rhovae.fit``) instead of the dataset the config names."""
    if cfg.dataset == PYTHON_DATA and raw is None:
        raise RhovaeError(
            "this run was trained on data given to rhovae.fit; evaluate it from Python: "
            "rhovae.load(run_dir).log_likelihood(x)"
        )
    if cfg.model in FRAME_MODELS:
        from rhovae.data.frame_data import load_frames

        return load_frames(
            cfg.dataset, cfg.data_dir or None, cfg.pixels, cfg.val_size, device, cfg.limit or None,
            cfg.frames, cfg.missing_rate, LIKELIHOODS[cfg.likelihood].unit_interval,
        )  # fmt: skip
    backbone = MODELS.get(cfg.model)
    return load_data(
        cfg.dataset,
        cfg.data_dir or None,
        raw=raw,
        pixels=cfg.pixels,
        val_size=cfg.val_size,
        device=device,
        limit=cfg.limit or None,
        size=backbone.input_size if backbone else None,
        image_size=cfg.image_size or None,
        channels=cfg.channels or None,
        in_memory_limit_mb=cfg.in_memory_limit_mb,
        unit_interval=LIKELIHOODS[cfg.likelihood].unit_interval,
    )


def load_run(
    run_dir: str | Path,
    which: str = "best",
    device: str = "auto",
    encoder: nn.Module | None = None,
    decoder: nn.Module | None = None,
) -> tuple[VAE, RunConfig, dict[str, Any]]:
    """Rebuild the model of a run folder from ``best.pt`` (or ``last.pt``), in eval mode, with its
    training preprocessing attached. Runs trained with your own networks need fresh instances of the
    same ``encoder`` and ``decoder`` (rhovae never pickles code)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RhovaeError(f"{run_dir}: no such run folder")
    path = run_dir / f"{which}.pt"
    ckpt = load_checkpoint(path)
    cfg = from_dict(ckpt["config"], where=str(path))
    config_file = run_dir / "config.toml"
    if config_file.exists():
        saved = load_config(config_file).to_dict()
        differ = [k for k, v in cfg.to_dict().items() if k not in RESUMABLE_FIELDS and saved.get(k) != v]
        if differ:
            raise RhovaeError(
                f"{path} disagrees with {config_file} on {', '.join(differ)}; the folder mixes two runs"
            )
    if cfg.model == "custom" and encoder is None:
        raise RhovaeError(
            f"{run_dir} was trained with your own networks: load it from Python with "
            "rhovae.load(run_dir, encoder=..., decoder=...) (fresh instances of the same classes)"
        )
    cfg.validate(custom_networks=encoder is not None, python_data=cfg.dataset == PYTHON_DATA)
    try:
        model = build_model(
            cfg, tuple(ckpt["data_shape"]), encoder=encoder, decoder=decoder, meta=ckpt.get("data_meta") or {}
        )
        model.load_state_dict(ckpt["model"])
    except (RuntimeError, ValueError, TypeError, KeyError, IndexError) as e:
        if isinstance(e, RhovaeError):
            raise
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise RhovaeError(f"{path} does not fit its config: {first}") from None
    model.preprocessing = Preprocessing.from_dict(ckpt["preprocessing"])
    model.to(pick_device(device)).eval()
    return model, cfg, ckpt


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """The model in eval mode inside the block (no batch statistics), restored after."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)
