"""Tokenizers for the text recipes: characters, or byte-level BPE trained on the training split
with the ``tokenizers`` library (nothing is downloaded). Both save to / load from one JSON file."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, List

from .data import DataError, atomic_write

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
SPECIALS = [PAD, BOS, EOS, UNK]  # ids 0..3 in both tokenizers


class CharTokenizer:
    kind = "char"

    def __init__(self, chars: List[str]):
        self.itos = SPECIALS + list(chars)
        self.stoi = {c: i for i, c in enumerate(self.itos)}

    @classmethod
    def train(cls, text: str) -> "CharTokenizer":
        return cls(sorted(set(text)))

    @property
    def vocab_size(self) -> int:
        return len(self.itos)

    def encode(self, text: str) -> List[int]:
        unk = self.stoi[UNK]
        return [self.stoi.get(c, unk) for c in text]

    def decode(self, ids: Iterable[int]) -> str:
        return "".join(self.itos[i] for i in ids if i >= len(SPECIALS))

    def save(self, path) -> None:
        atomic_write(path, json.dumps({"kind": "char", "chars": self.itos[len(SPECIALS):]}))


class BPETokenizer:
    kind = "bpe"

    def __init__(self, tok):
        self.tok = tok

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int = 8000, min_frequency: int = 2) -> "BPETokenizer":
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

        tok = Tokenizer(models.BPE(unk_token=UNK))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=SPECIALS,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
        tok.train_from_iterator(texts, trainer=trainer)
        return cls(tok)

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size()

    def encode(self, text: str) -> List[int]:
        return self.tok.encode(text).ids

    def encode_batch(self, texts: List[str]) -> List[List[int]]:
        return [e.ids for e in self.tok.encode_batch(texts)]

    def decode(self, ids: Iterable[int]) -> str:
        return self.tok.decode([i for i in ids if i >= len(SPECIALS)]).strip()

    def save(self, path) -> None:
        atomic_write(path, json.dumps({"kind": "bpe", "tokenizer": json.loads(self.tok.to_str())}))


def load_tokenizer(path):
    """A tokenizer saved by ``save``; a damaged file is a DataError naming it."""
    try:
        obj = json.loads(Path(path).read_text(encoding="utf-8"))
        if isinstance(obj, dict) and obj.get("kind") == "char" and isinstance(obj.get("chars"), list):
            return CharTokenizer(obj["chars"])
        if isinstance(obj, dict) and obj.get("kind") == "bpe":
            from tokenizers import Tokenizer

            return BPETokenizer(Tokenizer.from_str(json.dumps(obj["tokenizer"])))
    except Exception as e:  # json, OSError, and the tokenizers library's own exception type
        raise DataError(f"{path}: not a readable tokenizer file ({type(e).__name__}: {e}); delete it to "
                        f"train the tokenizer again (with --overwrite)") from e
    raise DataError(f"{path}: unknown tokenizer file (expected a JSON object of kind 'char' or 'bpe')")


def encode_all(tok, texts: List[str]) -> List[List[int]]:
    if hasattr(tok, "encode_batch"):
        return tok.encode_batch(texts)
    return [tok.encode(t) for t in texts]
