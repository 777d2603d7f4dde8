"""Text tokenizers that reproduce open_clip's token ids exactly, without torch or open_clip.

The kinds the sidecar's ``tokenizer`` entry (``metadata.Tokenizer``) names:

- ``clip_bpe``: OpenAI CLIP's byte-level BPE (open_clip's ``SimpleTokenizer``), implemented here; it
  needs the BPE merges file (``bpe_simple_vocab_16e6.txt.gz``, copied into the exported bundle) and
  the ``ftfy`` and ``regex`` packages (``pip install nvclip-fast[text]``).
- ``hf``: a Hugging Face tokenizer (CLIPA's bert-base-uncased, SigLIP's sentencepiece) run the way
  open_clip's ``HFTokenizer`` runs it; needs ``transformers`` and the tokenizer's files on disk.
- ``siglip``: open_clip's ``SigLipTokenizer`` (a sentencepiece vocabulary), from files in the bundle.

Both return an int64 numpy array ``(len(texts), context_length)``.
"""

from __future__ import annotations

import gzip
import html
import importlib.util
import itertools
import string
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from . import metadata
from .metadata import CLIP_BPE_KIND, HF_KIND, TOKENIZER_KINDS
from .metadata import TOKENIZER_CLEAN as CLEAN_MODES

# open_clip's SigLipTokenizer pads with id 1 ("</s>"; 0 for the gemma vocabulary) and ends with EOS id 1.
SIGLIP_PAD_ID = {"gemma": 0}
SIGLIP_DEFAULT_PAD_ID = 1
SIGLIP_EOS_ID = 1
CLIP_BPE_VOCAB_FILE = "bpe_simple_vocab_16e6.txt.gz"  # the merges file open_clip ships
DEFAULT_CONTEXT_LENGTH = 77
# The text cleaning when the entry names none: open_clip's SimpleTokenizer's and HFTokenizer's defaults.
DEFAULT_CLEAN = {CLIP_BPE_KIND: "lower", HF_KIND: "whitespace"}

# CLIP's vocabulary: 256 byte symbols, the same 256 as word ends ("</w>"), then the merges, then the
# two special tokens; 49408 ids in all, so the merges file contributes 49408 - 512 - 2 merges.
CLIP_VOCAB_SIZE = 49408
START_OF_TEXT = "<start_of_text>"
END_OF_TEXT = "<end_of_text>"
WORD_END = "</w>"
_N_BYTE_SYMBOLS = 256
_N_MERGES = CLIP_VOCAB_SIZE - 2 * _N_BYTE_SYMBOLS - 2
_NO_MERGE = _N_MERGES  # rank of a pair that is not a merge: above every real rank

_PUNCTUATION_TABLE = str.maketrans("", "", string.punctuation)


class Tokenizer(Protocol):
    context_length: int

    def __call__(self, texts: str | Sequence[str]) -> np.ndarray: ...


def _require(module: str, why: str) -> Any:
    try:
        return __import__(module)
    except ImportError as e:
        raise ImportError(f"{why} needs the '{module}' package: pip install 'nvclip-fast[text]'") from e


# ---------------------------------------------------------------------------------------------------
# Text cleaning, as open_clip's tokenizers clean (tokenizer.py: basic_clean + the `clean` option).


def _basic_clean(text: str) -> str:
    ftfy = _require("ftfy", "text tokenization")
    text = ftfy.fix_text(text)
    return html.unescape(html.unescape(text)).strip()


def _collapse_whitespace(text: str) -> str:
    return " ".join(text.split())


def clean_text(text: str, mode: str) -> str:
    """open_clip's cleaning: ftfy + html unescape, then ``lower`` / ``whitespace`` / ``canonicalize``."""
    text = _basic_clean(text)
    if mode == "lower":
        return _collapse_whitespace(text).lower()
    if mode == "whitespace":
        return _collapse_whitespace(text)
    if mode == "canonicalize":
        # big_vision's canonicalization: underscores to spaces, punctuation dropped, lower case.
        return _collapse_whitespace(text.replace("_", " ").translate(_PUNCTUATION_TABLE).lower())
    raise ValueError(f"unknown clean mode {mode!r}; expected one of {CLEAN_MODES}")


# ---------------------------------------------------------------------------------------------------
# CLIP byte-level BPE


def _byte_symbol_table() -> tuple[list[str], list[str]]:
    """CLIP's reversible byte mapping: (the symbol of each byte 0..255, the symbols in vocab order).

    Printable Latin-1 bytes stand for themselves; the others (controls, space, soft hyphen, ...) get
    the code points 256, 257, ... in byte order, so no symbol is whitespace or a control. The
    vocabulary lists the printable bytes first, then the others.
    """
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    others = [b for b in range(_N_BYTE_SYMBOLS) if b not in set(printable)]
    symbol = {b: chr(b) for b in printable} | {b: chr(_N_BYTE_SYMBOLS + n) for n, b in enumerate(others)}
    return [symbol[b] for b in range(_N_BYTE_SYMBOLS)], [symbol[b] for b in printable + others]


def find_clip_bpe_vocab() -> Path:
    """open_clip's BPE merges file, found without importing open_clip (which imports torch)."""
    spec = importlib.util.find_spec("open_clip")
    if spec is not None and spec.submodule_search_locations:
        for location in spec.submodule_search_locations:
            candidate = Path(location) / CLIP_BPE_VOCAB_FILE
            if candidate.is_file():
                return candidate
    raise FileNotFoundError(
        f"the CLIP BPE vocabulary {CLIP_BPE_VOCAB_FILE} was not found: it ships with open_clip "
        "(pip install open_clip_torch) and inside every bundle `nvclip-fast export` writes"
    )


class ClipBpeTokenizer:
    """open_clip's ``SimpleTokenizer`` ids: ``[SOT] + bpe(clean(text)) + [EOT]``, zero padded,
    truncated to ``context_length`` with the last id forced to EOT."""

    def __init__(
        self,
        vocab: str | Path | None = None,
        context_length: int = DEFAULT_CONTEXT_LENGTH,
        clean: str = DEFAULT_CLEAN[CLIP_BPE_KIND],
    ):
        if clean not in CLEAN_MODES:
            raise ValueError(f"unknown clean mode {clean!r}; expected one of {CLEAN_MODES}")
        if context_length < 2:
            raise ValueError(f"context_length must be >= 2 (room for SOT and EOT), got {context_length}")
        regex = _require("regex", "CLIP BPE tokenization")
        path = Path(vocab) if vocab is not None else find_clip_bpe_vocab()
        with gzip.open(path, "rt", encoding="utf-8") as f:
            lines = f.read().split("\n")
        merges = [tuple(line.split()) for line in lines[1 : 1 + _N_MERGES]]  # line 0 is a header
        if len(merges) != _N_MERGES or any(len(m) != 2 for m in merges):
            raise ValueError(
                f"{path} is not a CLIP BPE merges file ({len(merges)} merges, expected {_N_MERGES})"
            )

        self._byte_symbols, vocab_symbols = _byte_symbol_table()
        vocab_list = [*vocab_symbols, *(s + WORD_END for s in vocab_symbols), *("".join(m) for m in merges)]
        vocab_list += [START_OF_TEXT, END_OF_TEXT]
        self._ids = {token: i for i, token in enumerate(vocab_list)}
        self._ranks = {merge: rank for rank, merge in enumerate(merges)}
        self._cache: dict[str, list[int]] = {}
        self.sot_id = self._ids[START_OF_TEXT]
        self.eot_id = self._ids[END_OF_TEXT]
        self.context_length = context_length
        self.clean = clean
        # Special tokens first, then contractions, letter runs, single digits, other non-space runs.
        self._pattern = regex.compile(
            rf"{START_OF_TEXT}|{END_OF_TEXT}|'s|'t|'re|'ve|'m|'ll|'d|[\p{{L}}]+|[\p{{N}}]|[^\s\p{{L}}\p{{N}}]+",
            regex.IGNORECASE,
        )

    def _word_ids(self, word: str) -> list[int]:
        """BPE of one pre-token: repeatedly merge the adjacent pair of lowest merge rank."""
        cached = self._cache.get(word)
        if cached is not None:
            return cached
        if word in (START_OF_TEXT, END_OF_TEXT):
            ids = [self._ids[word]]
        else:
            symbols = [self._byte_symbols[b] for b in word.encode("utf-8")]
            parts = [*symbols[:-1], symbols[-1] + WORD_END]
            while len(parts) > 1:
                pairs = enumerate(itertools.pairwise(parts))
                rank, i = min((self._ranks.get(pair, _NO_MERGE), i) for i, pair in pairs)
                if rank == _NO_MERGE:
                    break
                first, second = parts[i], parts[i + 1]
                merged: list[str] = []
                i = 0
                while i < len(parts):
                    if i + 1 < len(parts) and parts[i] == first and parts[i + 1] == second:
                        merged.append(first + second)
                        i += 2
                    else:
                        merged.append(parts[i])
                        i += 1
                parts = merged
            ids = [self._ids[p] for p in parts]
        self._cache[word] = ids
        return ids

    def encode(self, text: str) -> list[int]:
        """The BPE ids of ``text`` after cleaning, without SOT/EOT."""
        ids: list[int] = []
        for word in self._pattern.findall(clean_text(text, self.clean)):
            ids.extend(self._word_ids(word))
        return ids

    def __call__(self, texts: str | Sequence[str]) -> np.ndarray:
        texts = _as_text_list(texts)
        out = np.zeros((len(texts), self.context_length), dtype=np.int64)
        for row, text in enumerate(texts):
            ids = [self.sot_id, *self.encode(text), self.eot_id]
            if len(ids) > self.context_length:
                ids = ids[: self.context_length]
                ids[-1] = self.eot_id
            out[row, : len(ids)] = ids
        return out


# ---------------------------------------------------------------------------------------------------
# Hugging Face tokenizers


class HfTokenizer:
    """open_clip's ``HFTokenizer``: clean, then the HF tokenizer padded/truncated to ``context_length``;
    with ``strip_sep_token`` the SEP id becomes 0 (CLIPA). ``source`` is a directory holding the
    tokenizer's files (saved into the bundle at export) or a name already in the local HF cache; the
    network is never used."""

    def __init__(
        self,
        source: str | Path,
        context_length: int,
        clean: str = DEFAULT_CLEAN[HF_KIND],
        strip_sep_token: bool = False,
        special_ids: dict[str, int] | None = None,
    ):
        if clean not in CLEAN_MODES:
            raise ValueError(f"unknown clean mode {clean!r}; expected one of {CLEAN_MODES}")
        try:
            from transformers import AutoTokenizer
        except ImportError as e:
            raise ImportError(
                "Hugging Face tokenizers need the 'transformers' package: pip install transformers"
            ) from e
        try:
            # Local files only: loading a bundle never goes to the network (no retries, no waiting).
            self._tokenizer = AutoTokenizer.from_pretrained(str(source), local_files_only=True)
        except OSError as e:
            raise FileNotFoundError(
                f"Hugging Face tokenizer {str(source)!r} is not available offline: the bundle does not carry "
                "its files and it is not in the local Hugging Face cache; export the model again where the "
                "tokenizer is in that cache (its files are then saved into the bundle)"
            ) from e
        for attribute, token_id in (special_ids or {}).items():  # e.g. SigLIP's pad/eos ids
            setattr(self._tokenizer, attribute, token_id)
        self.context_length = context_length
        self.clean = clean
        self.strip_sep_token = strip_sep_token

    def __call__(self, texts: str | Sequence[str]) -> np.ndarray:
        texts = [clean_text(t, self.clean) for t in _as_text_list(texts)]
        if not texts:
            return np.zeros((0, self.context_length), dtype=np.int64)
        ids = self._tokenizer(
            texts, return_tensors="np", max_length=self.context_length, padding="max_length", truncation=True
        ).input_ids.astype(np.int64)
        if self.strip_sep_token:
            ids[ids == self._tokenizer.sep_token_id] = 0
        return ids


def _as_text_list(texts: str | Sequence[str]) -> list[str]:
    if isinstance(texts, str):
        return [texts]
    if isinstance(texts, (bytes, bytearray, memoryview)) or not isinstance(texts, Iterable):
        raise TypeError(
            f"texts must be a str or a sequence of str, got {type(texts).__name__}"
            + (" (decode bytes first: data.decode('utf-8'))" if isinstance(texts, (bytes, bytearray)) else "")
        )
    texts = list(texts)
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"texts[{i}]: expected str, got {type(text).__name__}")
    return texts


def load_tokenizer(
    spec: metadata.Tokenizer | Mapping[str, Any], base_dir: str | Path | None = None
) -> Tokenizer:
    """The tokenizer a sidecar's ``tokenizer`` entry describes (a ``metadata.Tokenizer`` or its JSON
    object); the files it names are relative to ``base_dir`` (default: the working directory)."""
    kind = spec.get("kind") if isinstance(spec, Mapping) else spec.kind
    if kind not in TOKENIZER_KINDS:
        raise ValueError(f"unknown tokenizer kind {kind!r}; expected one of {list(TOKENIZER_KINDS)}")
    spec = metadata.Tokenizer.from_dict(spec) if isinstance(spec, Mapping) else spec
    base = Path(base_dir) if base_dir is not None else Path.cwd()
    if kind == CLIP_BPE_KIND:  # a bundle without its vocabulary falls back to open_clip's copy, if installed
        vocab = base / spec.vocab if spec.vocab and (base / spec.vocab).is_file() else None
        return ClipBpeTokenizer(vocab, spec.context_length, spec.clean or DEFAULT_CLEAN[kind])
    if spec.mode:
        raise ValueError(f"tokenizer mode {spec.mode!r} (open_clip tokenizer_mode) is not supported")
    files = base / spec.files if spec.files and (base / spec.files).is_dir() else None
    if kind == HF_KIND:
        clean = spec.clean or DEFAULT_CLEAN[kind]
        return HfTokenizer(files or str(spec.name), spec.context_length, clean, spec.strip_sep_token)
    # open_clip's SigLipTokenizer: a T5/Gemma sentencepiece vocabulary, canonicalized text.
    if files is None:
        raise FileNotFoundError(
            f"the SigLIP tokenizer {spec.name!r} is not in the bundle (open_clip downloads its "
            "vocabulary): export where it can be downloaded so its files are saved"
        )
    special = {
        "pad_token_id": SIGLIP_PAD_ID.get(str(spec.name), SIGLIP_DEFAULT_PAD_ID),
        "eos_token_id": SIGLIP_EOS_ID,
    }
    return HfTokenizer(files, spec.context_length, "canonicalize", special_ids=special)
