"""Loaders of pamtorch.recipes.data on small files written here in each real format."""
import gzip
import os
import pickle
import stat
import struct

import numpy as np
import pytest
import torch

from pamtorch.recipes import data as D
from pamtorch.recipes.tokenize import BPETokenizer, CharTokenizer, load_tokenizer


# ----------------------------------------------------------------------------- helpers


def write_idx(path, array, gz):
    array = np.asarray(array, dtype=np.uint8)
    raw = bytes([0, 0, 0x08, array.ndim]) + struct.pack(">" + "I" * array.ndim, *array.shape) + array.tobytes()
    if gz:
        with gzip.open(path, "wb") as f:
            f.write(raw)
    else:
        path.write_bytes(raw)


def write_mnist(folder, gz=True, n_train=12, n_test=6, size=6):
    rng = np.random.default_rng(0)
    sfx = ".gz" if gz else ""
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        write_idx(folder / f"{prefix}-images-idx3-ubyte{sfx}", rng.integers(0, 256, (n, size, size)), gz)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte{sfx}", np.arange(n) % 3, gz)


def write_cifar(folder, n=4):
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in ("data_batch_1", "data_batch_2", "test_batch"):
        with open(folder / name, "wb") as f:
            pickle.dump({b"data": rng.integers(0, 256, (n, 3072)).astype(np.uint8),
                         b"labels": [i % 10 for i in range(n)]}, f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [f"c{i}".encode() for i in range(10)]}, f)


# ----------------------------------------------------------------------------- images


def test_digits_builtin():
    d = D.load_digits()
    assert d.image_shape == (1, 8, 8) and d.num_classes == 10
    assert len(d.train_y) + len(d.valid_y) == 1797
    assert set(d.valid_y.tolist()) == set(range(10))
    assert abs(float(d.train_x.mean())) < 1e-4 and abs(float(d.train_x.std()) - 1) < 1e-2
    assert torch.equal(D.load_digits().valid_y, d.valid_y)  # fixed split


@pytest.mark.parametrize("gz", [True, False])
def test_mnist_idx(tmp_path, gz):
    write_mnist(tmp_path, gz=gz)
    d = D.load_mnist(tmp_path)
    assert d.train_x.shape == (12, 1, 6, 6) and d.valid_x.shape == (6, 1, 6, 6)
    assert d.train_y.tolist() == [i % 3 for i in range(12)] and d.num_classes == 3
    assert D.load_images(None, str(tmp_path)).name.startswith("mnist")  # format guessed from the files


def test_read_idx_values(tmp_path):
    a = np.arange(24).reshape(2, 3, 4)
    write_idx(tmp_path / "x.gz", a, gz=True)
    assert D.read_idx(tmp_path / "x.gz").tolist() == a.tolist()


def test_mnist_errors_name_the_file(tmp_path):
    write_mnist(tmp_path, gz=False)
    bad = tmp_path / "train-images-idx3-ubyte"
    bad.write_bytes(b"\x01\x02\x03\x04garbage")
    with pytest.raises(D.DataError, match="train-images-idx3-ubyte.*not an IDX file"):
        D.load_mnist(tmp_path)
    write_idx(bad, np.zeros((12, 6, 6)), gz=False)
    bad.write_bytes(bad.read_bytes()[:-5])  # truncated data
    with pytest.raises(D.DataError, match="train-images-idx3-ubyte.*bytes"):
        D.load_mnist(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte").unlink()
    write_idx(bad, np.zeros((12, 6, 6)), gz=False)
    with pytest.raises(D.DataError, match="t10k-labels-idx1-ubyte.*not found"):
        D.load_mnist(tmp_path)


def test_mnist_label_count_mismatch(tmp_path):
    write_mnist(tmp_path, gz=False)
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.zeros(5), gz=False)
    with pytest.raises(D.DataError, match="train-labels-idx1-ubyte.*12 labels"):
        D.load_mnist(tmp_path)


def test_cifar10(tmp_path):
    write_cifar(tmp_path / "cifar-10-batches-py")
    d = D.load_cifar10(tmp_path)  # the parent folder works too
    assert d.train_x.shape == (8, 3, 32, 32) and d.valid_x.shape == (4, 3, 32, 32)
    assert d.num_classes == 4 and d.train_y.tolist() == [0, 1, 2, 3] * 2
    assert D.load_images(None, str(tmp_path)).name == "cifar10"


def test_cifar10_errors(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    write_cifar(folder)
    (folder / "test_batch").unlink()
    with pytest.raises(D.DataError, match="test_batch.*not found"):
        D.load_cifar10(folder)
    (folder / "test_batch").write_bytes(b"not a pickle")
    with pytest.raises(D.DataError, match="test_batch.*unpickle"):
        D.load_cifar10(folder)
    with open(folder / "test_batch", "wb") as f:
        pickle.dump({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}, f)
    with pytest.raises(D.DataError, match="test_batch.*3072"):
        D.load_cifar10(folder)


def _write_pngs(root, classes=("cat", "dog"), n=3, size=10, mode="RGB"):
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(n):
            shape = (size, size, 3) if mode == "RGB" else (size, size)
            Image.fromarray(rng.integers(0, 256, shape).astype(np.uint8), mode).save(root / c / f"{i}.png")


def test_image_folder_with_splits(tmp_path):
    _write_pngs(tmp_path / "train", n=4)
    _write_pngs(tmp_path / "val", n=2)
    d = D.load_image_folder(tmp_path, image_size=8)
    assert d.train_x.shape == (8, 3, 8, 8) and d.valid_x.shape == (4, 3, 8, 8)
    assert d.classes == ["cat", "dog"] and d.train_y.tolist() == [0] * 4 + [1] * 4
    assert D.load_images(None, str(tmp_path), 8).name.startswith("imagefolder")


def test_image_folder_flat_grey(tmp_path):
    _write_pngs(tmp_path, n=10, mode="L")
    d = D.load_image_folder(tmp_path)
    assert d.image_shape == (1, 10, 10) and len(d.train_y) == 18 and len(d.valid_y) == 2


def test_image_folder_errors(tmp_path):
    with pytest.raises(D.DataError, match="no images"):
        D.load_image_folder(tmp_path)
    _write_pngs(tmp_path, n=2)
    (tmp_path / "cat" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(D.DataError, match="broken.png.*cannot read"):
        D.load_image_folder(tmp_path)


def test_image_folder_too_few_images(tmp_path):
    _write_pngs(tmp_path / "train", n=1, classes=("cat",))
    (tmp_path / "val" / "cat").mkdir(parents=True)
    with pytest.raises(D.DataError, match=rf"{tmp_path / 'val'}: no images found"):
        D.load_image_folder(tmp_path)
    (tmp_path / "val" / "cat").rmdir()
    (tmp_path / "val").rmdir()
    with pytest.raises(D.DataError, match=rf"{tmp_path}: 1 image found \(expected at least 2"):
        D.load_image_folder(tmp_path)


def test_load_images_unknown(tmp_path):
    with pytest.raises(D.DataError, match="needs --data-dir"):
        D.load_images("mnist", None)
    with pytest.raises(D.DataError, match="unknown image data"):
        D.load_images("svhn", str(tmp_path))


# ----------------------------------------------------------------------------- text


def write_parallel(folder, n=(30, 5, 5), src="de", tgt="en"):
    folder.mkdir(parents=True, exist_ok=True)
    for split, k in zip(("train", "valid", "test"), n):
        (folder / f"{split}.{src}").write_text("".join(f"Hallo Welt {i}\n" for i in range(k)), encoding="utf-8")
        (folder / f"{split}.{tgt}").write_text("".join(f"Hello world {i}\n" for i in range(k)), encoding="utf-8")


def test_parallel(tmp_path):
    write_parallel(tmp_path)
    d = D.load_parallel(tmp_path, "de", "en")
    assert set(d) == {"train", "valid", "test"}
    assert d["train"][0][3] == "Hallo Welt 3" and d["train"][1][3] == "Hello world 3"
    (tmp_path / "test.de").unlink()
    (tmp_path / "test.en").unlink()
    assert set(D.load_parallel(tmp_path)) == {"train", "valid"}  # test split is optional


def test_parallel_errors(tmp_path):
    write_parallel(tmp_path)
    (tmp_path / "valid.en").write_text("one line\n")
    with pytest.raises(D.DataError, match="valid.de has 5 lines but .*valid.en has 1"):
        D.load_parallel(tmp_path)
    (tmp_path / "valid.en").unlink()
    with pytest.raises(D.DataError, match="valid.en: file not found"):
        D.load_parallel(tmp_path)
    (tmp_path / "train.de").write_bytes(b"\xff\xfe\xfa bad utf-8\n")
    with pytest.raises(D.DataError, match="train.de: not valid UTF-8"):
        D.load_parallel(tmp_path)


def test_toy_parallel():
    d = D.toy_parallel(n_train=10, n_valid=3)
    s, t = d["train"][0][0].split(), d["train"][1][0].split()
    assert [D.NUMBERS_DE.index(w) for w in s] == [D.NUMBERS_EN.index(w) for w in reversed(t)]


def test_text(tmp_path):
    f = tmp_path / "input.txt"
    f.write_text("abc " * 100)
    train, valid = D.load_text("text", str(f))
    assert len(train) == 360 and len(valid) == 40
    assert D.load_text(None, str(tmp_path))[0] == train  # folder with input.txt
    (tmp_path / "train.txt").write_text("x" * 200)
    (tmp_path / "valid.txt").write_text("y" * 50)
    assert D.load_text(None, str(tmp_path)) == ("x" * 200, "y" * 50)
    assert len(D.load_text(None, None)[0]) > 10_000  # built-in: scikit-learn's dataset descriptions
    f.write_text("short")
    with pytest.raises(D.DataError, match="only 5 characters"):
        D.load_text(None, str(f))
    with pytest.raises(D.DataError, match="missing.txt: file not found"):
        D.load_text(None, str(tmp_path / "missing.txt"))


# ----------------------------------------------------------------------------- batches, tokenizers


def test_epoch_sampler_is_a_pure_function_of_step():
    s = D.EpochSampler(10, 3, seed=1)
    epoch0 = torch.cat([s(i) for i in range(3)])
    assert len(set(epoch0.tolist())) == 9  # each example at most once per epoch
    assert not torch.equal(s(3), s(0)) or not torch.equal(s(4), s(1))  # a new order next epoch
    fresh = D.EpochSampler(10, 3, seed=1)
    assert torch.equal(fresh(4), s(4)) and torch.equal(fresh(1), s(1))
    assert not torch.equal(D.EpochSampler(10, 3, seed=2)(0), s(0))


def test_rank_slice():
    idx = torch.arange(8)
    parts = [D.rank_slice(idx, r, 2) for r in range(2)]
    assert torch.equal(torch.cat(parts), idx)
    assert D.rank_slice([1, 2, 3, 4], 1, 2) == [2, 4]


def test_char_tokenizer(tmp_path):
    tok = CharTokenizer.train("hello world")
    ids = tok.encode("hello")
    assert tok.decode(ids) == "hello" and min(ids) >= 4
    tok.save(tmp_path / "t.json")
    assert load_tokenizer(tmp_path / "t.json").encode("world") == tok.encode("world")


def test_bpe_tokenizer(tmp_path):
    texts = ["Die Katze sitzt auf der Matte.", "Größere Übungen sind schön."] * 20
    tok = BPETokenizer.train(texts, vocab_size=300)
    for t in texts[:2]:
        assert tok.decode(tok.encode(t)) == t  # lossless, umlauts included
    tok.save(tmp_path / "t.json")
    again = load_tokenizer(tmp_path / "t.json")
    assert again.encode(texts[1]) == tok.encode(texts[1]) and again.vocab_size == tok.vocab_size


# ----------------------------------------------------------------------------- issue 10 regressions


def test_parallel_lines_end_at_newline_only(tmp_path):
    """str.splitlines() also breaks at U+2028/2029, U+0085, \\x0b, \\x0c, \\x1c-\\x1e: one such
    character in a source line shifted every later pair by one (or gave a false line-count error)."""
    breaks = ["\u2028", "\u2029", "\x85", "\x0b", "\x0c", "\x1c", "\x1d", "\x1e"]
    de = [f"Satz {i}{b}mit Trenner" for i, b in enumerate(breaks)] + ["letzter Satz"]
    en = [f"sentence {i}" for i in range(len(breaks))] + ["last sentence"]
    write_parallel(tmp_path)  # valid/test splits
    (tmp_path / "train.de").write_text("\r\n".join(de) + "\r\n", encoding="utf-8", newline="")
    (tmp_path / "train.en").write_text("\n".join(en) + "\n", encoding="utf-8", newline="")
    src, tgt = D.load_parallel(tmp_path)["train"]
    assert src == de and tgt == en  # aligned, the breaks kept inside, \r\n and \n both end lines
    # one break on each side: the pairs between them stay aligned
    (tmp_path / "train.en").write_text("a\u2028b\nc\nd\x0ce\n", encoding="utf-8")
    (tmp_path / "train.de").write_text("A\u2028B\nC\nD\x1cE\n", encoding="utf-8")
    assert D.load_parallel(tmp_path)["train"] == (["A\u2028B", "C", "D\x1cE"], ["a\u2028b", "c", "d\x0ce"])
    assert D.read_lines(tmp_path / "train.de") == ["A\u2028B", "C", "D\x1cE"]
    (tmp_path / "x.txt").write_bytes(b"\xef\xbb\xbfno final newline\r\nsecond")
    assert D.read_lines(tmp_path / "x.txt") == ["no final newline", "second"]  # BOM dropped


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("where", ["data_batch_1", "test_batch", "batches.meta"])
def test_cifar10_refuses_a_pickle_that_runs_code(tmp_path, where):
    folder = tmp_path / "cifar-10-batches-py"
    write_cifar(folder)
    marker = tmp_path / "ran"
    with open(folder / where, "wb") as f:
        if where == "batches.meta":
            pickle.dump({b"label_names": [_RunsCode(marker)]}, f)
        else:
            pickle.dump({b"data": np.zeros((4, 3072), np.uint8), b"labels": _RunsCode(marker)}, f)
    with pytest.raises(D.DataError, match=rf"{where}: refused to unpickle '(posix|os)\.system'.*numpy arrays"):
        D.load_cifar10(folder)
    assert not marker.exists()


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_cifar10_restricted_unpickler_reads_numpy_arrays(tmp_path, protocol):
    """Real batches (Python 2 protocol 2, bytes via _codecs.encode) and newer protocols load."""
    folder = tmp_path / "c"
    folder.mkdir()
    rng = np.random.default_rng(1)
    data = {name: rng.integers(0, 256, (3, 3072)).astype(np.uint8) for name in ("data_batch_1", "test_batch")}
    for name, x in data.items():
        with open(folder / name, "wb") as f:
            pickle.dump({b"batch_label": b"training batch 1 of 5", b"data": x, b"labels": [0, 1, 2],
                         b"filenames": [b"a.png", b"b.png", b"c.png"]}, f, protocol=protocol)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [b"x", b"y", b"z"], b"num_vis": 3072}, f, protocol=protocol)
    d = D.load_cifar10(folder)
    assert d.classes == ["x", "y", "z"] and d.num_classes == 3
    raw = torch.from_numpy(data["data_batch_1"]).reshape(3, 3, 32, 32).float() / 255
    mean, std = raw.mean((0, 2, 3), keepdim=True), raw.std((0, 2, 3), keepdim=True)
    assert torch.allclose(d.train_x, (raw - mean) / std, atol=1e-5)
    with open(folder / "test_batch", "wb") as f:
        pickle.dump({b"data": np.zeros((3, 3072), np.int64), b"labels": [0, 1, 2]}, f, protocol=protocol)
    with pytest.raises(D.DataError, match="test_batch: 'data' is a ndarray of int64 .expected a numpy array of uint8"):
        D.load_cifar10(folder)


def test_empty_idx_files_name_the_file(tmp_path):
    write_mnist(tmp_path, gz=False)
    labels = tmp_path / "train-labels-idx1-ubyte"
    labels.write_bytes(b"")
    with pytest.raises(D.DataError, match=f"{labels}: empty file"):
        D.load_mnist(tmp_path)
    write_idx(labels, np.zeros(0), gz=False)  # a valid header, no items
    with pytest.raises(D.DataError, match=rf"{labels}: the IDX file holds no items \(shape \(0,\)\)"):
        D.load_mnist(tmp_path)
    write_idx(labels, np.arange(12) % 3, gz=False)
    gz = tmp_path / "t10k-images-idx3-ubyte.gz"  # a gzip file that holds nothing
    gz.write_bytes(gzip.compress(b""))
    (tmp_path / "t10k-images-idx3-ubyte").unlink()
    with pytest.raises(D.DataError, match=f"{gz}: empty file"):
        D.load_mnist(tmp_path)


def test_idx_label_outside_the_classes_is_refused(tmp_path):
    """One label 255 among the 10 MNIST classes made a 256-class model."""
    write_mnist(tmp_path, gz=False, n_train=20, n_test=10)
    y = np.arange(20) % 10
    y[7] = 255
    write_idx(tmp_path / "train-labels-idx1-ubyte", y, gz=False)
    with pytest.raises(D.DataError, match=r"train-labels-idx1-ubyte: labels 255 \(1x\) lie outside the classes 0\.\.9"):
        D.load_mnist(tmp_path)
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.arange(20) % 10, gz=False)
    yv = np.arange(10) % 10
    yv[[2, 3]] = 12
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", yv, gz=False)
    with pytest.raises(D.DataError, match=r"t10k-labels-idx1-ubyte: labels 12 \(2x\) lie outside the 10 training classes"):
        D.load_mnist(tmp_path)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.arange(10) % 10, gz=False)
    assert D.load_mnist(tmp_path).num_classes == 10


def test_cifar10_label_outside_the_classes_is_refused(tmp_path):
    folder = tmp_path / "c"
    write_cifar(folder, n=10)
    with open(folder / "data_batch_2", "wb") as f:
        pickle.dump({b"data": np.zeros((2, 3072), np.uint8), b"labels": [3, -1]}, f)
    with pytest.raises(D.DataError, match=r"data_batch_2: labels -1 \(1x\) lie outside the classes 0\.\.9"):
        D.load_cifar10(folder)


def test_data_names_are_checked():
    with pytest.raises(D.DataError, match="--data svhn: unknown image data"):
        D.load_images("svhn", None)
    with pytest.raises(D.DataError, match="--data images: unknown text data"):
        D.load_text("images", None)
    with pytest.raises(D.DataError, match="--src fr --tgt en: the built-in toy task"):
        D.toy_parallel(src="fr")


def test_atomic_write_respects_the_umask(tmp_path):
    old = os.umask(0o027)
    try:
        D.atomic_write(tmp_path / "a.txt", "text")
        CharTokenizer.train("abc").save(tmp_path / "tok.json")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a.txt").stat().st_mode) == 0o640
    assert stat.S_IMODE((tmp_path / "tok.json").stat().st_mode) == 0o640
    D.atomic_write(tmp_path / "b.bin", b"\x00\x01")
    assert stat.S_IMODE((tmp_path / "b.bin").stat().st_mode) == 0o666 & ~old
    assert (tmp_path / "b.bin").read_bytes() == b"\x00\x01"
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


def test_atomic_write_failure_names_the_file_and_leaves_no_temp(tmp_path):
    import errno

    def full(f):
        f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    (tmp_path / "c.pt").write_bytes(b"old")
    with pytest.raises(D.UserError, match=rf"{tmp_path / 'c.pt'}: write failed \(No space left on device\)"):
        D.atomic_write(tmp_path / "c.pt", full)
    assert os.listdir(tmp_path) == ["c.pt"] and (tmp_path / "c.pt").read_bytes() == b"old"
    (tmp_path / "c.pt.123.abcd.tmp").write_bytes(b"")
    (tmp_path / "other.tmp").write_bytes(b"")
    assert D.stale_temp_files(tmp_path, ["c.pt"]) == [tmp_path / "c.pt.123.abcd.tmp"]


def test_corrupt_tokenizer_file_is_a_data_error(tmp_path):
    (tmp_path / "t.json").write_text('{"kind": "char", "chars": ["a"')
    with pytest.raises(D.DataError, match=r"t.json: not a readable tokenizer file \(JSONDecodeError"):
        load_tokenizer(tmp_path / "t.json")
    (tmp_path / "t.json").write_text('{"kind": "word"}')
    with pytest.raises(D.DataError, match="t.json: unknown tokenizer file"):
        load_tokenizer(tmp_path / "t.json")
