"""Data loaders for the training recipes.

Everything returns plain tensors or lists of strings; nothing is downloaded. Built-in data
comes with the install (scikit-learn's bundled ``load_digits`` images and dataset
descriptions); everything else is read from a directory the user passes (``--data-dir``).

Formats:

* ``mnist``: MNIST / Fashion-MNIST IDX files (``train-images-idx3-ubyte[.gz]``,
  ``train-labels-idx1-ubyte[.gz]``, ``t10k-images-idx3-ubyte[.gz]``, ``t10k-labels-idx1-ubyte[.gz]``),
  gzip or raw. The t10k split is used as the validation split.
* ``cifar10``: the ``cifar-10-batches-py`` folder (pickled ``data_batch_1..5`` and ``test_batch``),
  read with a restricted unpickler that builds only dicts, lists, bytes, str, ints and numpy
  arrays and refuses any other Python object (a pickle that would run code is an error).
* ``imagefolder``: ``DIR/train/<class>/*.png`` (+ ``DIR/val|valid|test/<class>/...``), or
  ``DIR/<class>/*`` split 90/10. Needs Pillow (installed with matplotlib).
* ``parallel``: IWSLT raw layout ``train.SRC``/``train.TGT``, ``valid.*``, optional ``test.*``; lines
  end at ``\n`` only (a trailing ``\r`` is dropped), so U+2028 and other Unicode breaks stay inside.
* ``text``: a plain UTF-8 text file (or a folder with ``train.txt`` [+ ``valid.txt``] or ``input.txt``).

Class labels must be 0..K-1 with every class present in the training split (K is the number of
classes). A missing or malformed file raises :class:`DataError` naming the file and what was expected.
"""
from __future__ import annotations

import gzip
import os
import pickle
import random
import secrets
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch


class UserError(ValueError):
    """A mistake in the command line, a data file or the output folder: ``pamtorch`` reports it in
    one line (``pamtorch: error: ...``) and exits with status 2."""


class DataError(UserError):
    """A data file is missing or not in the expected format."""


def at_least(cfg, low: int, *names: str) -> None:
    """Refuse a model config field below ``low`` (a --set mistake) with one clear line."""
    for name in names:
        v = getattr(cfg, name)
        if v < low:
            raise UserError(f"--set {name}={v}: expected an integer >= {low}")


def atomic_write(path, data) -> None:
    """Write ``data`` (bytes, str, or a function that writes to a binary file) to ``path`` through a
    temporary file in the same folder, fsync, then ``os.replace``: readers (and a resumed run) see the
    old or the new file, never a torn one. The file gets the permissions of a plain ``open``
    (0666 less the umask). A failed write removes the temporary file and raises :class:`UserError`
    naming ``path``; an interrupted process leaves ``PATH.<pid>.<random>.tmp`` (see ``stale_temp_files``)."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    except OSError as e:
        raise UserError(f"{path}: cannot write ({e.strerror}); choose a writable --out") from e
    try:
        with os.fdopen(fd, "wb") as f:
            if callable(data):
                data(f)
            else:
                f.write(data.encode("utf-8") if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        # torch.save reports a failed write (e.g. a full disk) as a RuntimeError of its zip writer
        if isinstance(e, (OSError, RuntimeError)):
            reason = e.strerror if isinstance(e, OSError) and e.strerror else " ".join(str(e).split())
            raise UserError(f"{path}: write failed ({reason}); free disk space or choose another --out") from e
        raise


def stale_temp_files(folder, names) -> List[Path]:
    """Temporary files ``NAME.*.tmp`` in ``folder`` left by an interrupted ``atomic_write`` of ``names``."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir()
                  if p.name.endswith(".tmp") and any(p.name.startswith(n + ".") for n in names) and p.is_file())


# ----------------------------------------------------------------------------- images


@dataclass
class ImageData:
    train_x: torch.Tensor  # (N, C, H, W) float32, normalized
    train_y: torch.Tensor  # (N,) int64
    valid_x: torch.Tensor
    valid_y: torch.Tensor
    num_classes: int
    name: str = ""
    classes: List[str] = field(default_factory=list)

    @property
    def image_shape(self) -> Tuple[int, int, int]:
        return tuple(self.train_x.shape[1:])


def _normalize(train: torch.Tensor, *others: torch.Tensor):
    """Per-channel standardization with statistics of the training split."""
    dims = (0, 2, 3)
    mean = train.mean(dim=dims, keepdim=True)
    std = train.std(dim=dims, keepdim=True).clamp_min(1e-6)
    return [(t - mean) / std for t in (train,) + others]


def _finish(train_x, train_y, valid_x, valid_y, num_classes, name, classes=None) -> ImageData:
    train_x, valid_x = _normalize(train_x.float(), valid_x.float())
    return ImageData(train_x.contiguous(), train_y.long(), valid_x.contiguous(), valid_y.long(),
                     int(num_classes), name, list(classes or [str(i) for i in range(num_classes)]))


def load_digits(valid_fraction: float = 0.2) -> ImageData:
    """scikit-learn's bundled 8x8 digits (1,797 images, 10 classes), split 80/20 (fixed, stratified)."""
    try:
        from sklearn.datasets import load_digits as _load
    except ImportError as e:  # pragma: no cover - depends on the install
        raise DataError("the built-in 'digits' data needs scikit-learn: pip install 'pamtorch[train]'") from e
    d = _load()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(d.target, dtype=torch.long)
    # deterministic stratified split, independent of the training seed
    g = torch.Generator().manual_seed(0)
    train_idx, valid_idx = [], []
    for c in range(10):
        idx = (y == c).nonzero().flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        k = int(round(len(idx) * valid_fraction))
        valid_idx.append(idx[:k])
        train_idx.append(idx[k:])
    tr, va = torch.cat(train_idx).sort().values, torch.cat(valid_idx).sort().values
    return _finish(x[tr], y[tr], x[va], y[va], 10, "digits")


def read_idx(path) -> torch.Tensor:
    """Read an IDX file (gzip or raw) as a uint8 tensor of its stored shape."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found (expected an IDX file, gzip or raw)")
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as e:
        raise DataError(f"{path}: cannot read ({e}); expected an IDX file, gzip or raw") from e
    if not data:
        raise DataError(f"{path}: empty file (expected an IDX file, gzip or raw)")
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise DataError(f"{path}: not an IDX file (expected magic bytes 00 00 <type> <ndim>)")
    dtype_code, ndim = data[2], data[3]
    if dtype_code != 0x08:
        raise DataError(f"{path}: IDX element type 0x{dtype_code:02x} not supported (expected 0x08, unsigned byte)")
    header = 4 + 4 * ndim
    if ndim == 0 or len(data) < header:
        raise DataError(f"{path}: truncated IDX header")
    shape = struct.unpack(">" + "I" * ndim, data[4:header])
    n = 1
    for s in shape:
        n *= s
    if len(data) - header != n:
        raise DataError(f"{path}: IDX header says shape {tuple(shape)} ({n} bytes) but the file holds "
                        f"{len(data) - header} bytes of data")
    if n == 0:
        raise DataError(f"{path}: the IDX file holds no items (shape {tuple(shape)})")
    return torch.frombuffer(bytearray(data[header:]), dtype=torch.uint8).reshape(shape)


def _find(directory: Path, stem: str, what: str) -> Path:
    for name in (stem, stem + ".gz", stem.replace("-idx", ".idx"), stem.replace("-idx", ".idx") + ".gz"):
        p = directory / name
        if p.is_file():
            return p
    raise DataError(f"{directory / stem}[.gz]: file not found (expected {what})")


def load_mnist(directory) -> ImageData:
    """MNIST or Fashion-MNIST from the four IDX files (t10k is used as the validation split)."""
    d = Path(directory)
    if not d.is_dir():
        raise DataError(f"{d}: not a directory (expected a folder with MNIST-style IDX files)")
    xs, ys, files = {}, {}, {}
    for split, prefix in (("train", "train"), ("valid", "t10k")):
        xp = _find(d, f"{prefix}-images-idx3-ubyte", "MNIST-style IDX images")
        yp = _find(d, f"{prefix}-labels-idx1-ubyte", "MNIST-style IDX labels")
        x, y = read_idx(xp), read_idx(yp)
        if x.dim() != 3:
            raise DataError(f"{xp}: expected 3 dimensions (N, H, W), got shape {tuple(x.shape)}")
        if y.dim() != 1 or len(y) != len(x):
            raise DataError(f"{yp}: expected {len(x)} labels to match {xp.name}, got shape {tuple(y.shape)}")
        xs[split], ys[split] = x.unsqueeze(1).float() / 255.0, y.long()
        files[split] = yp
    num_classes = check_labels([(ys["train"], files["train"])], [(ys["valid"], files["valid"])])
    return _finish(xs["train"], ys["train"], xs["valid"], ys["valid"], num_classes, f"mnist:{d.name}")


def check_labels(train, valid) -> int:
    """The number of classes K. ``train`` and ``valid`` are lists of (labels, file): the training
    labels must be exactly the classes 0..K-1 (each present) and the validation labels must lie
    among them. Anything else is a DataError naming the file and the offending values (e.g. one
    label 255 in a 10-class file)."""
    values = torch.cat([y for y, _ in train]).unique()
    values = values[values >= 0]
    k = 0
    while k < len(values) and int(values[k]) == k:
        k += 1
    for i, (y, f) in enumerate(train + valid):
        bad = y[(y < 0) | (y >= k)]
        if len(bad):
            v, c = bad.unique(return_counts=True)
            counts = _show_counts(dict(zip(v.tolist(), c.tolist())))
            if i < len(train):
                raise DataError(f"{f}: labels {counts} lie outside the classes 0..{k - 1} that the training labels "
                                f"cover without a gap (expected every label in 0..K-1, each class present)")
            raise DataError(f"{f}: labels {counts} lie outside the {k} training classes 0..{k - 1}")
    return k


def _show_counts(counts: dict, most: int = 8) -> str:
    items = [f"{v} ({c}x)" for v, c in list(counts.items())[:most]]
    return ", ".join(items) + (f" and {len(counts) - most} more values" if len(counts) > most else "")


class _Refused(Exception):
    pass


class _CifarUnpickler(pickle.Unpickler):
    """Builds only what a CIFAR-10 batch holds: dicts, lists, bytes, str, ints (pickle opcodes, no
    globals) and numpy arrays by numpy's reconstruct path. Any other global (a function that a
    crafted pickle would call, e.g. ``os.system``) is refused before it is looked up."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"), ("numpy", "dtype"),
        ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),  # protocol 5
        ("_codecs", "encode"),  # how protocol 2 stores bytes: encode(str, "latin1")
    }

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise _Refused(f"{module}.{name}")
        return super().find_class(module, name)


def safe_unpickle(path: Path, what: str):
    """``pickle.load`` through :class:`_CifarUnpickler` (Python 2 strings read as bytes)."""
    try:
        with open(path, "rb") as f:
            return _CifarUnpickler(f, encoding="bytes").load()
    except _Refused as e:
        raise DataError(f"{path}: refused to unpickle '{e}': {what} holds only dicts, lists, bytes, str, ints "
                        f"and numpy arrays, and this file asks for another Python object (it may run code)") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror})") from e
    except Exception as e:
        raise DataError(f"{path}: cannot unpickle ({type(e).__name__}: {e}); expected {what}") from e


def _unpickle(path: Path) -> dict:
    if not path.is_file():
        raise DataError(f"{path}: file not found (expected a CIFAR-10 python batch)")
    obj = safe_unpickle(path, "a CIFAR-10 python batch")
    if not isinstance(obj, dict):
        raise DataError(f"{path}: expected a dict with b'data' and b'labels', got {type(obj).__name__}")
    obj = {k.decode() if isinstance(k, bytes) else k: v for k, v in obj.items()}
    if "data" not in obj or "labels" not in obj:
        raise DataError(f"{path}: expected keys 'data' and 'labels', found {sorted(map(str, obj))}")
    return obj


def load_cifar10(directory) -> ImageData:
    """CIFAR-10 ``cifar-10-batches-py`` (the folder itself or its parent); test_batch is the validation split."""
    d = Path(directory)
    if (d / "cifar-10-batches-py").is_dir():
        d = d / "cifar-10-batches-py"
    if not d.is_dir():
        raise DataError(f"{d}: not a directory (expected cifar-10-batches-py)")

    def read(names):
        xs, ys, labelled = [], [], []
        for name in names:
            obj = _unpickle(d / name)
            data, labels = obj["data"], obj["labels"]
            if not isinstance(data, np.ndarray) or data.dtype != np.uint8:
                raise DataError(f"{d / name}: 'data' is a {type(data).__name__} of "
                                f"{getattr(data, 'dtype', '-')} (expected a numpy array of uint8)")
            x = torch.from_numpy(np.ascontiguousarray(data)).flatten()
            if isinstance(labels, np.ndarray) and labels.dtype.kind in "iu" and labels.ndim == 1:
                labels = labels.tolist()
            if not isinstance(labels, list) or not all(type(v) is int for v in labels):
                raise DataError(f"{d / name}: 'labels' must be a list of ints")
            if x.numel() != len(labels) * 3072:
                raise DataError(f"{d / name}: expected {len(labels)} rows of 3072 bytes (3x32x32), "
                                f"got {x.numel()} bytes")
            xs.append(x.reshape(-1, 3, 32, 32))
            ys.append(torch.tensor(labels, dtype=torch.long))
            labelled.append((ys[-1], d / name))
        return torch.cat(xs).float() / 255.0, torch.cat(ys), labelled

    names = sorted(p.name for p in d.glob("data_batch_*"))
    if not names:
        raise DataError(f"{d / 'data_batch_1'}: file not found (expected CIFAR-10 python batches)")
    tx, ty, train_labels = read(names)
    vx, vy, valid_labels = read(["test_batch"])
    classes = None
    meta = d / "batches.meta"
    if meta.is_file():
        m = safe_unpickle(meta, "CIFAR-10 batches.meta")
        label_names = m.get(b"label_names") if isinstance(m, dict) else None
        if not isinstance(label_names, list) or not all(isinstance(c, (bytes, str)) for c in label_names):
            raise DataError(f"{meta}: expected a dict with b'label_names', a list of class names")
        classes = [c.decode() if isinstance(c, bytes) else c for c in label_names]
    n = check_labels(train_labels, valid_labels)
    return _finish(tx, ty, vx, vy, n, "cifar10", classes if classes and len(classes) == n else None)


IMG_EXT = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".ppm", ".pgm", ".tif", ".tiff", ".webp"}


def load_image_folder(directory, image_size: Optional[int] = None, valid_fraction: float = 0.1) -> ImageData:
    """Images in class folders (``DIR/train/<class>/x.png`` + ``DIR/val/<class>/...``, or ``DIR/<class>/``)."""
    try:
        from PIL import Image
    except ImportError as e:
        raise DataError("imagefolder data needs Pillow (it comes with matplotlib): pip install pillow") from e
    d = Path(directory)
    if not d.is_dir():
        raise DataError(f"{d}: not a directory (expected <split>/<class>/<image> folders)")

    def list_split(root: Path):
        classes = sorted(p.name for p in root.iterdir() if p.is_dir())
        items = []
        for ci, c in enumerate(classes):
            for f in sorted((root / c).iterdir()):
                if f.suffix.lower() in IMG_EXT:
                    items.append((f, ci))
        return classes, items

    valid_root = next((d / n for n in ("val", "valid", "validation", "test") if (d / n).is_dir()), None)
    if (d / "train").is_dir():
        classes, train_items = list_split(d / "train")
        if valid_root is not None:
            vclasses, valid_items = list_split(valid_root)
            if vclasses != classes:
                raise DataError(f"{valid_root}: class folders {vclasses} differ from {d / 'train'}: {classes}")
        else:
            valid_items = None
    else:
        classes, train_items = list_split(d)
        valid_items = None
    if not classes or not train_items:
        raise DataError(f"{d}: no images found (expected class folders holding {sorted(IMG_EXT)} files)")
    if valid_items is not None and not valid_items:
        raise DataError(f"{valid_root}: no images found (expected class folders holding {sorted(IMG_EXT)} files)")
    if valid_items is None:  # deterministic split
        if len(train_items) < 2:
            raise DataError(f"{d}: {len(train_items)} image found (expected at least 2 to split 90/10 into "
                            f"training and validation images, or a val/ folder)")
        rng = random.Random(0)
        items = list(train_items)
        rng.shuffle(items)
        k = max(1, int(len(items) * valid_fraction))
        valid_items, train_items = items[:k], items[k:]

    mode = None
    size = image_size

    def read(items):
        nonlocal mode, size
        out = []
        for f, _ in items:
            try:
                with Image.open(f) as im:
                    if mode is None:
                        mode = "L" if im.mode in ("1", "L", "I", "I;16", "F") else "RGB"
                    im = im.convert(mode)
                    if size is None:
                        size = im.size[0]
                    if im.size != (size, size):
                        im = im.resize((size, size), Image.BILINEAR)
                    t = torch.tensor(bytearray(im.tobytes()), dtype=torch.uint8)
            except (OSError, ValueError, Image.DecompressionBombError) as e:
                raise DataError(f"{f}: cannot read image ({e})") from e
            c = 1 if mode == "L" else 3
            out.append(t.reshape(size, size, c).permute(2, 0, 1))
        return torch.stack(out).float() / 255.0, torch.tensor([c for _, c in items], dtype=torch.long)

    tx, ty = read(train_items)
    vx, vy = read(valid_items)
    return _finish(tx, ty, vx, vy, len(classes), f"imagefolder:{d.name}", classes)


IMAGE_DATA = (None, "digits", "mnist", "fashion-mnist", "cifar10", "imagefolder", "auto")


def augment_images(x: torch.Tensor, generator: torch.Generator, pad: Optional[int] = None) -> torch.Tensor:
    """Light augmentation, per image: a random crop of the image zero-padded by ``pad`` pixels on
    each side (default side/8, the standard 4 at 32x32) and a horizontal flip with probability 1/2.

    The images are standardized, so the zero padding is the channel mean. Indexing only, no
    arithmetic: the same under every ``--arith``.
    """
    b, c, h, w = x.shape
    pad = max(1, round(h / 8)) if pad is None else pad
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (b,), generator=generator)
    dx = torch.randint(0, 2 * pad + 1, (b,), generator=generator)
    flip = torch.rand(b, generator=generator) < 0.5
    rows = dy[:, None] + torch.arange(h)                                   # (B, H)
    cols = dx[:, None] + torch.arange(w)                                   # (B, W)
    cols = torch.where(flip[:, None], cols.flip(1), cols)
    return padded[torch.arange(b)[:, None, None, None], torch.arange(c)[None, :, None, None],
                  rows[:, None, :, None], cols[:, None, None, :]]


class ImageTask:
    """Image classification glue for recipes/train.py (``vit``, ``cnn``): batches that are a pure
    function of (seed, step), optionally augmented (:func:`augment_images`), the label-smoothed
    cross-entropy loss and the evaluation (valid loss and accuracy). A recipe's Task sets
    ``self.model`` and ``self.cfg`` after ``__init__``."""

    metric = "accuracy"
    unit = "img"

    def __init__(self, data: ImageData, hp, device):
        self.data, self.device = data, device
        from ..nn.functional import torch_label_smoothing

        self.label_smoothing = torch_label_smoothing(hp.label_smoothing, data.num_classes, hp.smoothing)
        augment = getattr(hp, "augment", None)  # None: augment the data sets the recipe names (cnn: cifar10)
        self.augment = bool(augment) if augment is not None else data.name in hp.extra.get("augment_data", ())
        self.train_size = len(data.train_y)
        self.sampler = None

    def steps_per_epoch(self, batch_size):
        return max(1, self.train_size // batch_size)

    def batch(self, step, batch_size, seed, rank=0, world=1):
        """This rank's share of the global batch of ``step`` (augmented as a whole before the split,
        so the processes together see what one process would)."""
        if self.sampler is None or self.sampler.batch_size != min(batch_size, self.train_size):
            self.sampler = EpochSampler(self.train_size, batch_size, seed)
        idx = self.sampler(step)
        x, y = self.data.train_x[idx], self.data.train_y[idx]
        if self.augment:  # its own random stream, a pure function of (seed, step): --resume is exact
            x = augment_images(x, torch.Generator().manual_seed(2 ** 62 + seed * 1_000_003 + step))
        return rank_slice(x, rank, world).to(self.device), rank_slice(y, rank, world).to(self.device)

    def loss(self, model, batch):
        x, y = batch
        logits = model(x)
        return torch.nn.functional.cross_entropy(logits, y, label_smoothing=self.label_smoothing), len(y)

    @torch.no_grad()
    def evaluate(self, model, final=False, batch_size=500):
        model.eval()
        total, correct, n = 0.0, 0, 0
        for i in range(0, len(self.data.valid_y), batch_size):
            x = self.data.valid_x[i:i + batch_size].to(self.device)
            y = self.data.valid_y[i:i + batch_size].to(self.device)
            logits = model(x)
            total += torch.nn.functional.cross_entropy(logits, y, reduction="sum").item()
            correct += (logits.argmax(-1) == y).sum().item()
            n += len(y)
        model.train()
        return {"valid_loss": total / n, "accuracy": correct / n}


def load_images(data: Optional[str], data_dir: Optional[str], image_size: Optional[int] = None) -> ImageData:
    """Dispatch on ``--data`` (digits, mnist, cifar10, imagefolder; guessed from the folder if omitted)."""
    if data not in IMAGE_DATA:
        raise DataError(f"--data {data}: unknown image data (expected one of {', '.join(IMAGE_DATA[1:])})")
    if data_dir is None:
        if data not in (None, "digits"):
            raise DataError(f"--data {data} needs --data-dir")
        return load_digits()
    d = Path(data_dir)
    if data in (None, "auto"):
        if not d.exists():
            raise DataError(f"{d}: not found")
        names = {p.name for p in d.iterdir()} if d.is_dir() else set()
        if any(n.startswith("train-images") for n in names):
            data = "mnist"
        elif "cifar-10-batches-py" in names or "data_batch_1" in names:
            data = "cifar10"
        else:
            data = "imagefolder"
    if data in ("mnist", "fashion-mnist"):
        return load_mnist(d)
    if data == "cifar10":
        return load_cifar10(d)
    if data == "imagefolder":
        return load_image_folder(d, image_size)
    return load_digits()


# ----------------------------------------------------------------------------- text


def read_lines(path) -> List[str]:
    """The lines of a UTF-8 text file. A line ends at ``\n`` only (a ``\r`` before it is dropped):
    unlike ``str.splitlines``, U+2028/U+2029, U+0085, ``\x0b``, ``\x0c`` and ``\x1c``-``\x1e``
    stay inside their line, so line-aligned parallel files stay aligned. A byte-order mark is dropped."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not valid UTF-8 text ({e})") from e
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror})") from e
    if not text:
        return []
    lines = text.split("\n")
    if lines[-1] == "":  # the newline that ends the last line
        lines.pop()
    return [line[:-1] if line.endswith("\r") else line for line in lines]


def load_parallel(directory, src: str = "de", tgt: str = "en") -> Dict[str, Tuple[List[str], List[str]]]:
    """Parallel text in IWSLT raw layout: ``{train,valid[,test]}.{src,tgt}``, one sentence per line."""
    d = Path(directory)
    if not d.is_dir():
        raise DataError(f"{d}: not a directory (expected train.{src}, train.{tgt}, valid.{src}, valid.{tgt})")
    out = {}
    for split in ("train", "valid", "test"):
        sp, tp = d / f"{split}.{src}", d / f"{split}.{tgt}"
        if split == "test" and not sp.exists() and not tp.exists():
            continue
        for p in (sp, tp):
            if not p.is_file():
                raise DataError(f"{p}: file not found (expected one {split} sentence per line, "
                                f"aligned with {split}.{tgt if p == sp else src})")
        s, t = read_lines(sp), read_lines(tp)
        if len(s) != len(t):
            raise DataError(f"{sp} has {len(s)} lines but {tp} has {len(t)}: parallel files must be line-aligned")
        if not s:
            raise DataError(f"{sp}: empty (expected one sentence per line)")
        out[split] = (s, t)
    return out


NUMBERS_EN = "zero one two three four five six seven eight nine".split()
NUMBERS_DE = "null eins zwei drei vier fünf sechs sieben acht neun".split()


def toy_parallel(n_train: int = 4000, n_valid: int = 200, seed: int = 0, src: str = "de", tgt: str = "en"):
    """A built-in toy translation task (no files): German digit words to English, reversed order.

    Only meant for smoke tests and demos; BLEU on it measures whether training works at all.
    """
    rng = random.Random(seed)
    vocab = {"de": NUMBERS_DE, "en": NUMBERS_EN}
    if src not in vocab or tgt not in vocab:
        raise DataError(f"--src {src} --tgt {tgt}: the built-in toy task translates between 'de' and 'en' only "
                        f"(give --data-dir for other languages)")

    def make(n):
        s, t = [], []
        for _ in range(n):
            digits = [rng.randrange(10) for _ in range(rng.randint(2, 9))]
            s.append(" ".join(vocab[src][i] for i in digits))
            t.append(" ".join(vocab[tgt][i] for i in reversed(digits)))
        return s, t

    return {"train": make(n_train), "valid": make(n_valid), "test": make(n_valid)}


def builtin_text() -> str:
    """English text that comes with scikit-learn: its bundled dataset descriptions (~100 kB)."""
    try:
        import sklearn
    except ImportError as e:  # pragma: no cover
        raise DataError("the built-in text needs scikit-learn: pip install 'pamtorch[train]'") from e
    d = Path(sklearn.__file__).parent / "datasets" / "descr"
    files = sorted(d.glob("*.rst"))
    if not files:
        raise DataError(f"{d}: no .rst files found for the built-in text data")
    return "\n\n".join(f.read_text(encoding="utf-8") for f in files)


def load_text(data: Optional[str], data_dir: Optional[str], valid_fraction: float = 0.1) -> Tuple[str, str]:
    """(train_text, valid_text) from a file, a folder, or the built-in text."""
    if data not in (None, "sklearn-docs", "builtin", "text"):
        raise DataError(f"--data {data}: unknown text data (expected sklearn-docs, the built-in text, or text "
                        f"with --data-dir)")
    if data_dir is None:
        if data not in (None, "sklearn-docs", "builtin"):
            raise DataError(f"--data {data} needs --data-dir")
        text = builtin_text()
    else:
        p = Path(data_dir)
        if p.is_dir():
            if (p / "train.txt").is_file():
                train = "\n".join(read_lines(p / "train.txt"))
                if (p / "valid.txt").is_file():
                    return train, "\n".join(read_lines(p / "valid.txt"))
                text = train
            elif (p / "input.txt").is_file():
                text = "\n".join(read_lines(p / "input.txt"))
            else:
                raise DataError(f"{p / 'train.txt'}: file not found (expected train.txt [+ valid.txt] "
                                f"or input.txt: plain UTF-8 text)")
        else:
            text = "\n".join(read_lines(p))
    if len(text) < 100:
        raise DataError(f"{data_dir or 'built-in text'}: only {len(text)} characters (expected at least 100)")
    k = int(len(text) * (1 - valid_fraction))
    return text[:k], text[k:]


# ----------------------------------------------------------------------------- batch order


class EpochSampler:
    """Index batches of an epoch-shuffled data set, a pure function of (seed, step).

    Epoch ``e`` uses ``randperm(n)`` from a generator seeded with ``(seed, e)``, the last partial
    batch is dropped. Because nothing depends on earlier calls, resuming at step ``s`` gives exactly
    the batches an uninterrupted run would have seen.
    """

    def __init__(self, n: int, batch_size: int, seed: int):
        if n < 1:
            raise DataError("no training examples")
        self.n, self.batch_size, self.seed = n, min(batch_size, n), seed
        self.batches_per_epoch = max(1, n // self.batch_size)
        self._epoch, self._perm = None, None

    def permutation(self, epoch: int) -> torch.Tensor:
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._epoch, self._perm = epoch, torch.randperm(self.n, generator=g)
        return self._perm

    def __call__(self, step: int) -> torch.Tensor:
        epoch, i = divmod(step, self.batches_per_epoch)
        return self.permutation(epoch)[i * self.batch_size:(i + 1) * self.batch_size]


def rank_slice(indices, rank: int, world: int):
    """This rank's contiguous share of a global batch (equal shares when world divides its size)."""
    if world == 1:
        return indices
    return indices.tensor_split(world)[rank] if torch.is_tensor(indices) else \
        [indices[i] for i in range(rank, len(indices), world)]
