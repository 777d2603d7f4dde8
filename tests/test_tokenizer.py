"""The torch-free tokenizers give open_clip's token ids exactly."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from nvclip_fast.tokenizer import (
    ClipBpeTokenizer,
    HfTokenizer,
    clean_text,
    find_clip_bpe_vocab,
    load_tokenizer,
)

open_clip_tokenizer = pytest.importorskip("open_clip.tokenizer")

TEXTS = [
    "a photo of a cat",
    "",
    "   ",
    "A PHOTO OF A DOG.",
    "It's a bird, isn't it? They'll've gone; we'd say I'm sure you're right.",
    "numbers 1234567890 and 3.14159 and 1,000,000",
    "emoji 🐈‍⬛ 🚀 and symbols ©®™ ±∞ → ←",
    "日本語のテキスト、中文文本，한국어 텍스트",
    "Ünïcödé àccents façade naïve coöperate",
    "html &amp;lt;b&amp;gt; entities &quot;quoted&quot; &#39;apostrophe&#39;",
    "mojibake: â€œquotesâ€\x9d and Ã©",
    "tabs\tand\nnewlines\r\nand   many    spaces",
    "snake_case_words and kebab-case-words and CamelCaseWords",
    "<start_of_text> literal special tokens <end_of_text>",
    "zero\u200bwidth and non\u00a0breaking",
    "a " * 100,  # longer than the context: truncated with EOT forced last
    "supercalifragilisticexpialidocious antidisestablishmentarianism",
    "!!!??? ... --- *** $$$ ### @@@",
]


@pytest.fixture(scope="module")
def reference_clip():
    return {clean: open_clip_tokenizer.SimpleTokenizer(clean=clean) for clean in ("lower", "whitespace")}


@pytest.mark.parametrize("context_length", [77, 32, 16])
def test_clip_bpe_matches_open_clip(reference_clip, context_length):
    ours = ClipBpeTokenizer(context_length=context_length)
    expected = reference_clip["lower"](TEXTS, context_length=context_length).numpy()
    got = ours(TEXTS)
    assert got.dtype == np.int64
    assert got.shape == (len(TEXTS), context_length)
    np.testing.assert_array_equal(got, expected)


def test_clip_bpe_whitespace_clean_matches_open_clip(reference_clip):
    ours = ClipBpeTokenizer(clean="whitespace")
    np.testing.assert_array_equal(ours(TEXTS), reference_clip["whitespace"](TEXTS).numpy())


def test_clip_bpe_matches_open_clip_tokenize():
    # open_clip.tokenize is what users of CLIP models call; the same ids from the same file.
    import open_clip

    text = ["a diagram", "a dog", "a cat"]
    np.testing.assert_array_equal(ClipBpeTokenizer()(text), open_clip.tokenize(text).numpy())


def test_clip_bpe_special_ids_and_truncation():
    tok = ClipBpeTokenizer(context_length=8)
    ids = tok("one two three four five six seven eight nine")[0]
    assert ids[0] == tok.sot_id == 49406
    assert ids[-1] == tok.eot_id == 49407
    short = tok("cat")[0]
    assert short[0] == tok.sot_id
    assert list(short[3:]) == [0] * 5  # [SOT, cat, EOT, 0, ...]


@pytest.mark.parametrize("mode", ["lower", "whitespace", "canonicalize"])
def test_clean_text_matches_open_clip(mode):
    reference = open_clip_tokenizer.get_clean_fn(mode)
    for text in TEXTS:
        assert clean_text(text, mode) == reference(text)


def test_bad_inputs_are_named():
    tok = ClipBpeTokenizer()
    with pytest.raises(TypeError, match=r"texts\[1\]: expected str, got int"):
        tok(["ok", 3])
    with pytest.raises(ValueError, match="unknown clean mode 'upper'"):
        ClipBpeTokenizer(clean="upper")
    with pytest.raises(ValueError, match="context_length must be >= 2"):
        ClipBpeTokenizer(context_length=1)
    assert tok([]).shape == (0, 77)


def test_load_tokenizer_from_sidecar_entry(tmp_path):
    vocab = tmp_path / "model.bpe.txt.gz"
    vocab.write_bytes(find_clip_bpe_vocab().read_bytes())
    tok = load_tokenizer({"kind": "clip_bpe", "vocab": vocab.name, "context_length": 32}, tmp_path)
    assert isinstance(tok, ClipBpeTokenizer)
    assert tok.context_length == 32
    np.testing.assert_array_equal(tok(TEXTS), open_clip_tokenizer.SimpleTokenizer()(TEXTS, 32).numpy())
    with pytest.raises(ValueError, match="unknown tokenizer kind 'sentencepiece'"):
        load_tokenizer({"kind": "sentencepiece"}, tmp_path)


def test_not_a_merges_file_is_refused(tmp_path):
    import gzip

    bad = tmp_path / "bad.txt.gz"
    with gzip.open(bad, "wt") as f:
        f.write("header\na b\n")
    with pytest.raises(ValueError, match="not a CLIP BPE merges file"):
        ClipBpeTokenizer(bad)


def test_tokenizer_import_needs_no_torch():
    code = (
        "import sys; from nvclip_fast.tokenizer import ClipBpeTokenizer; ClipBpeTokenizer()(['a cat']); "
        "assert 'torch' not in sys.modules, 'torch was imported'; assert 'open_clip' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# --- Hugging Face tokenizers: no hub here, so build a small BERT WordPiece vocabulary on disk and
# compare with open_clip's own HFTokenizer loading the same files (as CLIPA's bert-base-uncased).

BERT_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    transformers = pytest.importorskip("transformers", reason="HF tokenizers need transformers")
    words = sorted({w for t in TEXTS for w in clean_text(t, "whitespace").lower().split()})
    pieces = sorted({c for w in words for c in w} | {"##" + c for w in words for c in w})
    directory = tmp_path_factory.mktemp("bert")
    vocab = directory / "vocab.txt"
    vocab.write_text("\n".join(BERT_SPECIALS + words[:40] + pieces) + "\n", encoding="utf-8")
    transformers.BertTokenizerFast(vocab_file=str(vocab), do_lower_case=True).save_pretrained(directory)
    return directory


@pytest.mark.parametrize(("context_length", "strip_sep"), [(32, True), (16, False)])
def test_hf_tokenizer_matches_open_clip(bert_dir, context_length, strip_sep):
    reference = open_clip_tokenizer.HFTokenizer(
        str(bert_dir), context_length=context_length, strip_sep_token=strip_sep
    )
    ours = HfTokenizer(bert_dir, context_length=context_length, strip_sep_token=strip_sep)
    got = ours(TEXTS)
    np.testing.assert_array_equal(got, reference(TEXTS).numpy())
    sep = 3  # [SEP] in BERT_SPECIALS order
    assert (sep in got) != strip_sep


def test_hf_tokenizer_from_sidecar_entry(bert_dir):
    entry = {
        "kind": "hf",
        "name": "bert-base-uncased",
        "files": bert_dir.name,
        "context_length": 32,
        "strip_sep_token": True,
        "clean": "whitespace",
    }
    tok = load_tokenizer(entry, bert_dir.parent)
    reference = open_clip_tokenizer.HFTokenizer(str(bert_dir), context_length=32, strip_sep_token=True)
    np.testing.assert_array_equal(tok(TEXTS), reference(TEXTS).numpy())


def test_hf_tokenizer_missing_offline_is_clear(tmp_path):
    pytest.importorskip("transformers", reason="HF tokenizers need transformers")
    with pytest.raises(FileNotFoundError, match="not available offline"):
        HfTokenizer(tmp_path / "no-such-tokenizer", context_length=32)


def test_siglip_entry_wiring(bert_dir):
    # No SigLIP sentencepiece vocabulary can be had offline; a saved HF tokenizer stands in to check
    # what the siglip kind adds: canonicalized text and open_clip's pad id (1) for "c4-en".
    entry = {"kind": "siglip", "name": "c4-en", "files": bert_dir.name, "context_length": 16}
    tok = load_tokenizer(entry, bert_dir.parent)
    ids = tok(["a photo of a cat!", "A PHOTO of a cat"])
    np.testing.assert_array_equal(ids[0], ids[1])
    assert ids[0, -1] == 1  # padded with id 1


def test_siglip_and_modes_missing_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="SigLIP tokenizer 'c4-en' is not in the bundle"):
        load_tokenizer({"kind": "siglip", "name": "c4-en", "context_length": 64}, tmp_path)
    with pytest.raises(ValueError, match="tokenizer mode 'clips'"):
        load_tokenizer({"kind": "hf", "name": "x", "mode": "clips", "context_length": 16}, tmp_path)
