"""SentencePiece BPE with byte fallback: the tokenizer the trainer and preprocess share.

Settings are chosen so ``decode(encode(text)) == text`` for any UTF-8 text (code included): identity
normalization, no dummy prefix, whitespace kept as is, unknown characters spelled as bytes, ``"\\n"`` a piece of
its own. Ids are fixed: unk 0, bos 1, eos 2 (= end of document), pad 3.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Iterator, Sequence

from megatron_adamc.errors import DataError

UNK_ID, BOS_ID, EOS_ID, PAD_ID = 0, 1, 2, 3
# 4 special ids + 256 byte pieces + the newline piece, plus room for the corpus's own characters.
MIN_VOCAB_SIZE = 320


def resolve_model_path(path: str, field: str = "--tokenizer") -> str:
    """Accept ``PREFIX.model`` or ``PREFIX``; a missing file is a one-line error naming the field."""
    if os.path.isfile(path):
        return path
    if os.path.isfile(path + ".model"):
        return path + ".model"
    raise DataError(f"{field}: tokenizer model not found: {path}; pass the .model that `tokenizer train` wrote")


class Tokenizer:
    """A SentencePiece model with the attributes megatron-core's GPTDataset expects (``eod``, ``pad``, ...)."""

    def __init__(self, path: str, field: str = "--tokenizer") -> None:
        self.path = resolve_model_path(path, field)
        with open(self.path, "rb") as handle:
            proto = handle.read()
        self._load(proto, field)

    def _load(self, proto: bytes, field: str = "--tokenizer") -> None:
        import sentencepiece as spm

        self._proto = proto
        self._sp = spm.SentencePieceProcessor()
        try:
            self._sp.LoadFromSerializedProto(proto)
        except Exception:  # sentencepiece raises bare RuntimeError/OSError on a corrupt proto
            raise DataError(f"{field}: {self.path} is not a SentencePiece model; pass a .model file") from None
        self.sha256 = hashlib.sha256(proto).hexdigest()
        self.vocab_size = int(self._sp.get_piece_size())
        self.unk_id = int(self._sp.unk_id())
        self.bos_id = int(self._sp.bos_id())
        self.eos_id = int(self._sp.eos_id())
        self.pad_id = int(self._sp.pad_id())
        # Keys megatron-core hashes into its index-cache names: a new tokenizer never reuses stale indices.
        self.unique_identifiers = {"class": type(self).__name__, "sha256": self.sha256, "vocab_size": self.vocab_size}

    # megatron-core's tokenizer interface (GPTDataset reads eod and pad; eos/bos for its collision check).
    @property
    def eod(self) -> int:
        return self.eos_id

    eod_id = eod

    @property
    def eos(self) -> int:
        return self.eos_id

    @property
    def bos(self) -> int:
        return self.bos_id

    @property
    def pad(self) -> int:
        return self.pad_id

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` with no bos/eos added."""
        return self._sp.encode(text, out_type=int)

    def encode_batch(self, texts: Sequence[str], num_threads: int = 1) -> list[list[int]]:
        return self._sp.encode(list(texts), out_type=int, num_threads=num_threads)

    def decode(self, ids: Iterable[int]) -> str:
        return self._sp.decode([int(i) for i in ids])

    def id_to_piece(self, token_id: int) -> str:
        return self._sp.id_to_piece(int(token_id))

    def __getstate__(self) -> dict:
        # The C++ processor does not pickle; the model bytes do (DataLoader workers, multiprocessing).
        return {"path": self.path, "proto": self._proto}

    def __setstate__(self, state: dict) -> None:
        self.path = state["path"]
        self._load(state["proto"])

    def __repr__(self) -> str:
        return f"Tokenizer({self.path!r}, vocab_size={self.vocab_size})"


def _sentences(documents: Iterable[str]) -> Iterator[str]:
    """SentencePiece trains on lines; newlines come back as the user-defined ``"\\n"`` piece."""
    for doc in documents:
        for line in doc.split("\n"):
            if line.strip():
                yield line


def train_tokenizer(
    documents: Iterable[str],
    output_prefix: str,
    vocab_size: int,
    input_sentence_size: int = 300_000,
    num_threads: int = 2,
    seed: int = 1234,
    character_coverage: float = 0.9995,
) -> Tokenizer:
    """Train a BPE model on ``documents`` and write ``output_prefix.model``/``.vocab`` (renamed into place at the end).

    ``input_sentence_size`` caps the lines sampled (shuffled) for training; that cap is what keeps the run short.
    """
    import sentencepiece as spm

    if vocab_size < MIN_VOCAB_SIZE:
        raise DataError(
            f"--vocab-size {vocab_size} is too small for 256 byte pieces + specials; use >= {MIN_VOCAB_SIZE}"
        )
    if vocab_size > 2**31 - 1:
        raise DataError(f"--vocab-size {vocab_size} is too large; use a value below 2**31")
    if output_prefix.endswith(".model"):
        output_prefix = output_prefix[: -len(".model")]
    out_dir = os.path.dirname(os.path.abspath(output_prefix))
    os.makedirs(out_dir, exist_ok=True)
    tmp_prefix = os.path.join(out_dir, f".{os.path.basename(output_prefix)}.tmp-{os.getpid()}")
    spm.set_random_generator_seed(seed)
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=_sentences(documents),
            model_prefix=tmp_prefix,
            model_type="bpe",
            vocab_size=vocab_size,
            byte_fallback=True,
            character_coverage=character_coverage,
            normalization_rule_name="identity",
            add_dummy_prefix=False,
            remove_extra_whitespaces=False,
            allow_whitespace_only_pieces=True,
            split_digits=True,
            user_defined_symbols=["\n"],
            unk_id=UNK_ID,
            bos_id=BOS_ID,
            eos_id=EOS_ID,
            pad_id=PAD_ID,
            input_sentence_size=input_sentence_size,
            shuffle_input_sentence=True,
            max_sentence_length=8192,
            num_threads=num_threads,
            minloglevel=2,
        )
    except RuntimeError as err:
        _remove(tmp_prefix)
        reason = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
        reason = reason.split("] ", 1)[-1]  # drop sentencepiece's "INTERNAL: file.cc(744) [check]" preamble
        raise DataError(f"--vocab-size {vocab_size}: SentencePiece refused it ({reason}); pick another size") from None
    except BaseException:
        _remove(tmp_prefix)
        raise
    for ext in (".vocab", ".model"):  # the .model last: its presence means the pair is complete
        os.replace(tmp_prefix + ext, output_prefix + ext)
    return Tokenizer(output_prefix + ".model")


def _remove(prefix: str) -> None:
    for ext in (".model", ".vocab"):
        if os.path.exists(prefix + ext):
            os.remove(prefix + ext)
