"""The SentencePiece tokenizer as Hugging Face files that ``AutoTokenizer.from_pretrained`` encodes identically.

Always written: ``tokenizer.model`` (the SentencePiece model itself) and ``tokenizer_config.json`` naming the
generic fast tokenizer. transformers 5 builds the fast tokenizer from ``tokenizer.model`` following the model's own
normalizer spec (no dummy prefix, whitespace kept, byte fallback, user-defined pieces whole), so it encodes like
SentencePiece. When transformers is installed at export time, ``tokenizer.json`` is written too (what other HF
consumers read), converted by transformers itself and checked against SentencePiece on a
probe text before it is kept. Neither BOS nor EOS is added and ``<s>`` in text stays text: the project's
``Tokenizer.encode`` adds none and never reads control pieces from text, and the models were trained that way.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from megatron_adamc.data.tokenizer import Tokenizer
from megatron_adamc.errors import DataError

# Code, whitespace runs, tabs, CRLF, digits, accents, CJK, an emoji (byte fallback) and control-piece spellings.
PROBE_TEXT = "def f(x):\n    return x  + 1\t# done\r\n\n  12345 héllo wörld 日本語 🤗 <s> </s> <unk> \u00a0end\n"


def tokenizer_config(tokenizer: Tokenizer, model_max_length: int) -> dict:
    piece = lambda token_id: tokenizer.id_to_piece(token_id) if token_id >= 0 else None
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": piece(tokenizer.bos_id),
        "eos_token": piece(tokenizer.eos_id),
        "unk_token": piece(tokenizer.unk_id),
        "pad_token": piece(tokenizer.pad_id),
        "add_bos_token": False,
        "add_eos_token": False,
        "split_special_tokens": True,
        "clean_up_tokenization_spaces": False,
        "model_max_length": model_max_length,
    }
    return {k: v for k, v in config.items() if v is not None}


def write_tokenizer(tokenizer: Tokenizer, out_dir: Path, model_max_length: int) -> list[str]:
    """Write the tokenizer files into ``out_dir``; returns their names."""
    shutil.copyfile(tokenizer.path, out_dir / "tokenizer.model")
    config = tokenizer_config(tokenizer, model_max_length)
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    written = ["tokenizer.model", "tokenizer_config.json"]
    backend = _fast_tokenizer(out_dir, config)
    if backend is not None:
        got = backend.encode(PROBE_TEXT, add_special_tokens=False)
        if got != tokenizer.encode(PROBE_TEXT):
            raise DataError(
                f"tokenizer {tokenizer.path}: transformers' conversion encodes differently from SentencePiece; "
                f"export with transformers uninstalled to ship tokenizer.model alone"
            )
        backend.backend_tokenizer.save(str(out_dir / "tokenizer.json"))
        written.append("tokenizer.json")
    return written


def _fast_tokenizer(out_dir: Path, config: dict):
    """transformers' fast tokenizer built from ``out_dir``'s tokenizer.model, or None without transformers."""
    try:
        import transformers
    except ImportError:
        return None
    if int(transformers.__version__.split(".")[0]) < 5:  # 4.x cannot convert this SentencePiece spec
        return None
    from transformers import PreTrainedTokenizerFast

    with tempfile.TemporaryDirectory() as scratch:  # tokenizer.model alone: the conversion path
        shutil.copyfile(out_dir / "tokenizer.model", Path(scratch) / "tokenizer.model")
        kwargs = {k: v for k, v in config.items() if k != "tokenizer_class"}
        return PreTrainedTokenizerFast.from_pretrained(scratch, **kwargs)
