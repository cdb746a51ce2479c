"""Tokenizers: exact round trips (property-tested), ids that match the tokenizers library, saving and loading."""

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llmmo.errors import DataError
from llmmo.tokenizer import Tokenizer, train_tokenizer

SAMPLE = "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n"
HARD = ["我爱编程", "emoji 🎉🧪 and flags 🇫🇷", "combining e\u0301 a\u0308 n\u0303", "\x00\t\r\n  ", "<|endoftext|>", ""]


@pytest.fixture(scope="module")
def bpe() -> Tokenizer:
    return train_tokenizer("bpe", [SAMPLE * 20, "我爱编程 🎉"], vocab_size=300)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text())
def test_bpe_round_trips_any_unicode(bpe: Tokenizer, text: str) -> None:
    assert bpe.decode(bpe.encode(text)) == text


@settings(max_examples=200, deadline=None)
@given(text=st.text(min_size=1))
def test_char_round_trips_any_unicode_over_its_alphabet(text: str) -> None:
    tok = train_tokenizer("char", [text])
    assert tok.decode(tok.encode(text)) == text
    assert tok.vocab_size == len(set(text))


@pytest.mark.parametrize("text", HARD)
def test_hard_strings_round_trip(bpe: Tokenizer, text: str) -> None:
    assert bpe.decode(bpe.encode(text)) == text
    if text:
        char = train_tokenizer("char", [text])
        assert char.decode(char.encode(text)) == text


def test_char_ids_are_nanogpt_ids_and_match_the_tokenizers_library() -> None:
    tok = train_tokenizer("char", [SAMPLE])
    chars = sorted(set(SAMPLE))
    assert tok.encode(SAMPLE) == [chars.index(c) for c in SAMPLE]
    assert tok.hf.encode(SAMPLE).ids == tok.encode(SAMPLE)  # our fast path and the JSON definition agree


def test_char_refuses_unknown_characters_clearly() -> None:
    tok = train_tokenizer("char", ["abc"])
    with pytest.raises(DataError, match=r"'z' are not in this char tokenizer's vocabulary.*--data.tokenizer bpe"):
        tok.encode("abz")


def test_word_tokenizer_caps_vocab_keeps_unk_and_is_lossy() -> None:
    text = "the cat sat on the mat <unk> the end\nthe cat\n"
    tok = train_tokenizer("word", [text], vocab_size=5)
    assert tok.vocab_size == 5
    vocab = tok.hf.get_vocab()
    assert vocab["<unk>"] == 0 and vocab["<eos>"] == 1
    assert {"the", "cat", "sat"} <= set(vocab)  # the three most frequent words
    ids = tok.encode("the dog sat\n")
    assert ids == [vocab["the"], 0, vocab["sat"], 1]
    assert tok.encode("<unk>") == [0]  # WikiText's own <unk> is ours
    assert tok.decode(ids) == "the <unk> sat <eos>"  # lossy, as documented


@pytest.mark.parametrize("kind", ["char", "word", "bpe"])
def test_save_load_gives_the_same_ids(tmp_path, kind: str) -> None:
    tok = train_tokenizer(kind, [SAMPLE], vocab_size=280)
    tok.save(tmp_path / "tokenizer.json")
    again = Tokenizer.load(tmp_path / "tokenizer.json")
    assert again.kind == kind and again.vocab_size == tok.vocab_size
    assert again.encode(SAMPLE) == tok.encode(SAMPLE)
    assert again.fingerprint == tok.fingerprint
    assert not list(tmp_path.glob("*.tmp"))


def test_token_bytes_sum_to_the_text_bytes(bpe: Tokenizer) -> None:
    text = SAMPLE + "我爱编程 🎉"
    assert bpe.token_bytes()[bpe.encode(text)].sum() == len(text.encode("utf-8"))
    char = train_tokenizer("char", [text])
    assert char.token_bytes()[char.encode(text)].sum() == len(text.encode("utf-8"))


def test_bad_tokenizer_files_are_reported(tmp_path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        Tokenizer.load(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(DataError, match="not a valid tokenizer.json"):
        Tokenizer.load(tmp_path / "bad.json")
    with pytest.raises(DataError, match="unknown tokenizer kind 'sentencepiece'"):
        train_tokenizer("sentencepiece", [SAMPLE])
