"""One tokenizer interface over SentencePiece ``.model`` and Hugging Face ``tokenizer.json``.

Diffusion training needs three ids beyond plain text: ``eod_id`` (ends every
document, so packing can recover document boundaries), ``mask_id`` (the noise
token) and ``pad_id``.  Tokenizers of autoregressive models usually lack a mask
token, so :meth:`Tokenizer.from_file` adds one and records its id:

* SentencePiece models we train ourselves reserve ``[MASK]`` as a *control*
  symbol (a user-defined symbol would also be produced when the literal text
  ``[MASK]`` occurs in the corpus, silently injecting noise tokens into x_0);
* a foreign ``.model`` without one gets ``mask_id = piece_size`` (one past its
  last piece) and ``vocab_size`` grows by one;
* a ``tokenizer.json`` gets ``[MASK]`` added as a special token.

Whatever the backend, :meth:`Tokenizer.encode` never returns ``mask_id`` for
text: a literal mask string in the input is encoded as ordinary characters.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Iterable, List, Optional, Sequence

from ..errors import ConfigError, DataError
from .records import read_json_if_present

__all__ = ["Tokenizer", "train_sentencepiece", "tokenizer_path", "resolve_tokenizer",
           "MASK_TOKEN", "MASK_TOKEN_CANDIDATES", "EOD_TOKEN_CANDIDATES"]

MASK_TOKEN = "[MASK]"
# Spellings used by existing diffusion LMs; an existing one is reused instead of adding ours.
MASK_TOKEN_CANDIDATES = (MASK_TOKEN, "<|mask|>", "<|mdm_mask|>", "<mask>")
# End-of-document spellings of common tokenizers, tried when the file does not name one.
EOD_TOKEN_CANDIDATES = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>", "<|eos|>")


@dataclass(frozen=True)
class _Specials:
    vocab_size: int
    eod_id: int
    mask_id: int
    pad_id: int
    mask_added: bool


class Tokenizer:
    """Text <-> ids with the special ids diffusion training needs.

    Build it with :meth:`from_file`; ``path`` is kept so worker processes and
    dataset metadata can refer to the same file.
    """

    def __init__(self, backend: Any, kind: str, path: str, specials: _Specials, mask_token: str,
                 eod_token: Optional[str] = None) -> None:
        self._backend = backend
        self.kind = kind
        self.path = path
        self._specials = specials
        self.mask_token = mask_token
        self._eod_token = eod_token

    def __reduce__(self):
        # Backends do not pickle portably; worker processes reload the same file instead.
        return (_reload, (self.path, self.mask_token, self._eod_token))

    # ----------------------------------------------------------------- loading
    @classmethod
    def from_file(
        cls, path: str | os.PathLike, *, mask_token: str = MASK_TOKEN, eod_token: Optional[str] = None
    ) -> "Tokenizer":
        """Load ``*.model`` (SentencePiece), ``*.json`` (tokenizers) or a directory holding one.

        ``eod_token`` overrides the end-of-document token when the file does not
        declare one (SentencePiece ``eos``, or ``eos_token`` in a sibling
        ``tokenizer_config.json``).
        """
        resolved = _resolve_path(os.fspath(path))
        if resolved.endswith(".json"):
            return _load_hf(resolved, mask_token, eod_token)
        return _load_sentencepiece(resolved, mask_token, eod_token)

    # -------------------------------------------------------------- properties
    @property
    def vocab_size(self) -> int:
        """Number of ids in use, including an added mask token (the model pads further)."""
        return self._specials.vocab_size

    @property
    def eod_id(self) -> int:
        return self._specials.eod_id

    @property
    def mask_id(self) -> int:
        return self._specials.mask_id

    @property
    def pad_id(self) -> int:
        return self._specials.pad_id

    @property
    def mask_added(self) -> bool:
        """True when the mask token is ours (not in the original tokenizer file)."""
        return self._specials.mask_added

    # ----------------------------------------------------------------- codecs
    def encode(self, text: str) -> List[int]:
        """Ids of ``text`` without BOS/EOS; never contains ``mask_id``."""
        ids = self._encode_raw(text)
        if self.mask_id in ids:
            ids = self._encode_around_mask_literal(text)
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids``; the mask id is rendered as the mask token string."""
        if self.kind != "sentencepiece":  # the mask is a real (special) token there
            return self._decode_raw([int(i) for i in ids])
        # SentencePiece renders control symbols as "" and knows no id past its pieces.
        out: List[str] = []
        run: List[int] = []
        for i in ids:
            i = int(i)
            if i == self.mask_id:
                if run:
                    out.append(self._decode_raw(run))
                    run = []
                out.append(self.mask_token)
            else:
                run.append(i)
        if run:
            out.append(self._decode_raw(run))
        return "".join(out)

    def __repr__(self) -> str:
        s = self._specials
        return (f"Tokenizer({self.kind}, {self.path!r}, vocab_size={s.vocab_size}, eod_id={s.eod_id}, "
                f"mask_id={s.mask_id}{' (added)' if s.mask_added else ''}, pad_id={s.pad_id})")

    # ---------------------------------------------------------------- private
    def _encode_raw(self, text: str) -> List[int]:
        if self.kind == "sentencepiece":
            return list(self._backend.encode(text, out_type=int))
        return list(self._backend.encode(text, add_special_tokens=False).ids)

    def _decode_raw(self, ids: List[int]) -> str:
        if self.kind == "sentencepiece":
            return self._backend.decode(ids)
        return self._backend.decode(ids, skip_special_tokens=False)

    def _encode_around_mask_literal(self, text: str) -> List[int]:
        # The backend matched the literal mask string as one token: spell it with
        # character (or byte) pieces instead, which decodes to the same text.
        literal = self._literal_ids()
        if literal is not None:
            out: List[int] = []
            for i in self._encode_raw(text):
                out.extend(literal if i == self.mask_id else (i,))
            return out
        # No per-character pieces: encode the text around the literal, and the literal in
        # two halves (a tokenizer with a dummy prefix may then insert a space marker).
        head, tail = self.mask_token[:-1], self.mask_token[-1:]
        ids: List[int] = []
        for k, part in enumerate(text.split(self.mask_token)):
            if k:
                ids += self._encode_raw(head) + self._encode_raw(tail)
            if part:
                ids += self._encode_raw(part)
        return ids

    def _literal_ids(self) -> Optional[List[int]]:
        ids: List[int] = []
        for char in self.mask_token:
            i = self._piece_id(char)
            if i is None:  # SentencePiece byte fallback pieces
                pieces = [self._piece_id(f"<0x{b:02X}>") for b in char.encode("utf-8")]
                if any(p is None for p in pieces):
                    return None
                ids.extend(pieces)  # type: ignore[arg-type]
            else:
                ids.append(i)
        return ids if self.mask_id not in ids else None

    def _piece_id(self, piece: str) -> Optional[int]:
        if self.kind == "sentencepiece":
            i = self._backend.piece_to_id(piece)
            ok = 0 <= i < self._backend.get_piece_size() and self._backend.id_to_piece(i) == piece
            return i if ok else None
        return self._backend.token_to_id(piece)


def train_sentencepiece(
    texts: Iterable[str], output_path: str | os.PathLike, vocab_size: int, *, num_threads: int = 2
) -> Tokenizer:
    """Train a lossless SentencePiece BPE model with ``[MASK]`` reserved; return it loaded.

    Settings keep source code intact: no normalisation, whitespace runs are
    pieces, newline is its own piece, unseen characters fall back to bytes, so
    ``decode(encode(text)) == text``.  Ids: pad 0, unk 1, eos (= EOD) 2, [MASK] 3.
    BPE rather than unigram: on a few MB of code unigram training took 10-40x longer.
    """
    import io

    import sentencepiece as spm

    def lines() -> Iterable[str]:
        for text in texts:
            yield from (line for line in text.split("\n") if line.strip())

    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(lines()), model_writer=model, vocab_size=vocab_size,
            model_type="bpe", pad_id=0, unk_id=1, eos_id=2, bos_id=-1,
            control_symbols=[MASK_TOKEN], user_defined_symbols=["\n"], byte_fallback=True,
            character_coverage=1.0, normalization_rule_name="identity", remove_extra_whitespaces=False,
            add_dummy_prefix=False, allow_whitespace_only_pieces=True, split_digits=True,
            max_sentence_length=16384, num_threads=num_threads, minloglevel=2)
    except RuntimeError as err:  # e.g. "Vocabulary size too high" for a tiny corpus
        raise DataError(f"SentencePiece training failed: {err}; use more text or a smaller vocab_size") from err
    with open(output_path, "wb") as f:
        f.write(model.getvalue())
    return Tokenizer.from_file(output_path)


def tokenizer_path(data: Any, inherited: Optional[dict] = None) -> Optional[str]:
    """The tokenizer file of a run: ``data.tokenizer``, else the demo corpus's (``data.demo``, or a demo run
    whose ``data`` section ``inherited`` is: the init checkpoint's), else ``inherited["tokenizer"]``;
    ``None`` where none is named.  The one place that decides it (training stages, inference)."""
    theirs = inherited or {}
    if data.tokenizer:
        return data.tokenizer
    if data.demo or (theirs.get("demo") and not theirs.get("tokenizer")):
        from .demo_corpus import ensure_demo_data

        return ensure_demo_data(data.cache_dir if data.demo else theirs.get("cache_dir")).tokenizer_path
    return theirs.get("tokenizer") or None


def resolve_tokenizer(data: Any, inherited: Optional[dict] = None,
                      missing: str = "no tokenizer: set data.tokenizer (the one the init checkpoint was trained "
                                     "with) or data.demo=true") -> "Tokenizer":
    """:func:`tokenizer_path` loaded; :class:`ConfigError` ``missing`` where no tokenizer is named."""
    path = tokenizer_path(data, inherited)
    if path is None:
        raise ConfigError(missing)
    return Tokenizer.from_file(path)


# --------------------------------------------------------------------- loaders
def _resolve_path(path: str) -> str:
    if os.path.isdir(path):
        for name in ("tokenizer.json", "tokenizer.model"):
            candidate = os.path.join(path, name)
            if os.path.isfile(candidate):
                return candidate
        raise DataError(
            f"tokenizer directory {path!r} holds neither tokenizer.json nor tokenizer.model; "
            "pass the tokenizer file itself")
    if not os.path.isfile(path):
        raise DataError(
            f"tokenizer file {path!r} does not exist; pass a SentencePiece .model or a "
            "Hugging Face tokenizer.json")
    return path


def _load_sentencepiece(path: str, mask_token: str, eod_token: Optional[str]) -> Tokenizer:
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor()
    try:
        sp.Load(path)
    except (OSError, RuntimeError) as err:
        raise DataError(
            f"{path!r} is not a SentencePiece model ({err}); pass a .model file or a "
            "Hugging Face tokenizer.json") from err
    size = sp.get_piece_size()

    def lookup(token: str) -> Optional[int]:
        i = sp.piece_to_id(token)
        return i if 0 <= i < size and sp.id_to_piece(i) == token else None

    eod = lookup(eod_token) if eod_token else (sp.eos_id() if sp.eos_id() >= 0 else None)
    if eod is None and not eod_token:
        eod = next((i for i in map(lookup, EOD_TOKEN_CANDIDATES) if i is not None), None)
    if eod is None:
        raise DataError(
            f"SentencePiece model {path!r} has no end-of-document token"
            f"{f' {eod_token!r}' if eod_token else ''}; pass eod_token=<a piece of the model>")
    mask, mask_added, vocab = _find_mask(lookup, mask_token), False, size
    if mask is None:
        mask, mask_added, vocab = size, True, size + 1
    pad = sp.pad_id() if sp.pad_id() >= 0 else eod
    specials = _Specials(vocab_size=vocab, eod_id=eod, mask_id=mask, pad_id=pad, mask_added=mask_added)
    mask_name = mask_token if mask_added else sp.id_to_piece(mask)
    return Tokenizer(sp, "sentencepiece", path, specials, mask_name, eod_token)


def _load_hf(path: str, mask_token: str, eod_token: Optional[str]) -> Tokenizer:
    from tokenizers import AddedToken
    from tokenizers import Tokenizer as HFTokenizer

    try:
        tok = HFTokenizer.from_file(path)
    except Exception as err:  # tokenizers raises a bare Exception on malformed files
        raise DataError(
            f"{path!r} is not a Hugging Face tokenizer.json ({err}); pass a tokenizer.json "
            "or a SentencePiece .model") from err
    config = _sibling_tokenizer_config(path)

    def lookup(token: Optional[str]) -> Optional[int]:
        return tok.token_to_id(token) if token else None

    eod_name = eod_token or _token_name(config.get("eos_token"))
    eod = lookup(eod_name)
    if eod is None and not eod_token:
        eod = next((i for i in map(lookup, EOD_TOKEN_CANDIDATES) if i is not None), None)
    if eod is None:
        raise DataError(
            f"tokenizer {path!r} has no end-of-document token"
            f"{f' {eod_name!r}' if eod_name else ''}; pass eod_token=<a token of the vocabulary>")
    mask = _find_mask(lookup, mask_token)
    mask_added = mask is None
    if mask_added:
        tok.add_special_tokens([AddedToken(mask_token, special=True, normalized=False)])
        mask = tok.token_to_id(mask_token)
    pad = lookup(_token_name(config.get("pad_token")))
    specials = _Specials(
        vocab_size=max(tok.get_vocab_size(with_added_tokens=True), mask + 1),
        eod_id=eod, mask_id=mask, pad_id=eod if pad is None else pad, mask_added=mask_added)
    mask_name = mask_token if mask_added else tok.id_to_token(mask)
    return Tokenizer(tok, "huggingface", path, specials, mask_name, eod_token)


def _reload(path: str, mask_token: str, eod_token: Optional[str]) -> Tokenizer:
    return Tokenizer.from_file(path, mask_token=mask_token, eod_token=eod_token)


def _find_mask(lookup, preferred: str) -> Optional[int]:
    names = (preferred,) + tuple(c for c in MASK_TOKEN_CANDIDATES if c != preferred)
    return next((i for i in map(lookup, names) if i is not None), None)


def _sibling_tokenizer_config(path: str) -> dict:
    data = read_json_if_present(os.path.join(os.path.dirname(path), "tokenizer_config.json"), "fix or remove it")
    return data if isinstance(data, dict) else {}


def _token_name(value: Any) -> Optional[str]:
    """``eos_token`` in tokenizer_config.json is a string or ``{"content": ...}``."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None
