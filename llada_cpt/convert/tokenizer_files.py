"""Tokenizer files travel with converted checkpoints, with the mask token made permanent.

:meth:`llada_cpt.data.tokenizer.Tokenizer.from_file` decides the mask id (an
existing mask spelling, or ``[MASK]`` added after the last id).  A Hugging Face
``tokenizer.json`` is re-saved with that token added (and ``tokenizer_config.json``
told about it), so the copy loads with the same id everywhere - in our
``Tokenizer`` (now ``mask_added=False``) and in ``transformers``.  A SentencePiece
``.model`` is copied as is: ``Tokenizer`` adds the id deterministically at load.
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ..data.tokenizer import Tokenizer
from .errors import ConvertError

__all__ = ["TokenizerInfo", "TOKENIZER_FILES", "find_tokenizer", "inspect_tokenizer", "write_tokenizer",
           "copy_tokenizer_files"]

# what `transformers` saves for a tokenizer (whichever exist are copied)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json")


@dataclass(frozen=True)
class TokenizerInfo:
    """The source tokenizer and the ids conversion needs."""

    path: Path  # tokenizer.json or tokenizer.model
    vocab_size: int  # including the mask token
    mask_id: int
    mask_token: str
    mask_added: bool  # the source lacks a mask token
    eod_id: int
    kind: str  # huggingface | sentencepiece


def find_tokenizer(directory: str | os.PathLike) -> Optional[Path]:
    """``tokenizer.json`` (preferred) or ``tokenizer.model`` of a directory, else None."""
    for name in ("tokenizer.json", "tokenizer.model"):
        p = Path(directory) / name
        if p.is_file():
            return p
    return None


def inspect_tokenizer(path: str | os.PathLike) -> TokenizerInfo:
    tok = Tokenizer.from_file(path)
    return TokenizerInfo(Path(tok.path), tok.vocab_size, tok.mask_id, tok.mask_token, tok.mask_added,
                         tok.eod_id, tok.kind)


def copy_tokenizer_files(src_dir: Path, dst_dir: Path) -> None:
    dst_dir.mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES:
        if (src_dir / name).is_file():
            shutil.copy2(src_dir / name, dst_dir / name)


def write_tokenizer(info: TokenizerInfo, dst_dir: str | os.PathLike) -> Path:
    """Copy the tokenizer files into ``dst_dir`` with the mask token added; returns the tokenizer file."""
    dst = Path(dst_dir)
    copy_tokenizer_files(info.path.parent, dst)
    target = dst / info.path.name
    if not target.exists():  # a tokenizer file named otherwise (e.g. my_tok.json)
        shutil.copy2(info.path, target)
    if info.mask_added and info.kind == "huggingface":
        _add_mask_to_hf_files(info, dst, target)
    return target


def _add_mask_to_hf_files(info: TokenizerInfo, dst: Path, tokenizer_json: Path) -> None:
    from tokenizers import AddedToken
    from tokenizers import Tokenizer as HFTokenizer

    tok = HFTokenizer.from_file(str(tokenizer_json))
    tok.add_special_tokens([AddedToken(info.mask_token, special=True, normalized=False)])
    if tok.token_to_id(info.mask_token) != info.mask_id:  # the same rule as Tokenizer.from_file
        raise ConvertError(f"adding {info.mask_token} to {info.path} gave id {tok.token_to_id(info.mask_token)}, "
                           f"expected {info.mask_id}; the tokenizer has gaps in its ids")
    tok.save(str(tokenizer_json))
    cfg_file = dst / "tokenizer_config.json"
    cfg = json.loads(cfg_file.read_text()) if cfg_file.is_file() else {}
    cfg.setdefault("added_tokens_decoder", {})[str(info.mask_id)] = {
        "content": info.mask_token, "lstrip": False, "normalized": False, "rstrip": False,
        "single_word": False, "special": True,
    }
    cfg["mask_token"] = info.mask_token
    cfg_file.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")
