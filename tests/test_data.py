"""Data: named sources (mirror, cache, download), local text, the token cache, samplers and their errors."""

import hashlib
import http.server
import json
import os
import threading
import zipfile
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from llmmo.config import DataConfig
from llmmo.data import (
    EpochWindows,
    RandomWindows,
    eval_windows,
    load_corpus,
    prepare_data,
    sources,
    tokenize_file,
)
from llmmo.data.corpus import read_documents
from llmmo.data.sources import NamedSource, RemoteFile, pystdlib_files
from llmmo.errors import DataError
from llmmo.tokenizer import EOT, Tokenizer, train_tokenizer


@pytest.fixture(autouse=True)
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh cache per test, and no network: tests that download serve the file themselves."""
    monkeypatch.setenv("LLMMO_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("LLMMO_OFFLINE", "1")
    return tmp_path / "cache"


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


# ---------------------------------------------------------------------------------------- named sources


def test_tinyshakespeare_is_split_90_10_by_characters_with_a_65_symbol_alphabet(shakespeare: Path):
    text = shakespeare.read_text(encoding="utf-8")
    data = prepare_data(DataConfig(source="tinyshakespeare", tokenizer="char"))
    train, val = data.splits["train"], data.splits["val"]
    assert (len(train), len(val)) == (1_003_854, 111_540)
    assert (train.n_bytes, val.n_bytes) == (1_003_854, 111_540)  # ASCII: one byte per character
    assert data.tokenizer.kind == "char" and data.tokenizer.vocab_size == 65
    assert train.tokens.dtype == np.uint16 and isinstance(train.tokens, np.memmap)
    assert data.tokenizer.decode(train.tokens[:2000]) == text[:2000]
    assert data.tokenizer.decode(val.tokens) == text[1_003_854:]
    assert data.source == "tinyshakespeare"
    # "valid" and "validation" name the same split as "val"
    again = prepare_data(DataConfig(source="tinyshakespeare"), data.tokenizer, splits=("valid",))
    assert again.splits["valid"].path == val.path


def test_wikitext2_valid_loads_from_the_mirror_with_the_word_tokenizer(data_dir: Path):
    cfg = DataConfig(source="wikitext-2", tokenizer="word", vocab_size=10000, train_split="valid", val_split="test")
    data = prepare_data(cfg)  # offline, and the mirror has no train.txt: only valid and test are needed
    assert data.tokenizer.kind == "word" and data.tokenizer.vocab_size == 10000
    valid, test = data.splits["valid"], data.splits["test"]
    # PyTorch's word_language_model counts: every word plus one <eos> per line
    assert (len(valid), len(test)) == (217_646, 245_569)
    assert valid.n_bytes == (data_dir / "wikitext-2" / "valid.txt").stat().st_size
    words = data.tokenizer.decode(valid.tokens[:6]).split()
    assert words == ["<eos>", "=", "Homarus", "gammarus", "=", "<eos>"]
    # "val" is accepted for WikiText's "valid"
    alias = prepare_data(cfg, data.tokenizer, splits=("val",))
    assert alias.splits["val"].path == valid.path


def test_an_explicit_path_wins_then_the_cache_then_the_mirror(shakespeare: Path, cache: Path, tmp_path: Path):
    assert load_corpus(DataConfig()).splits["train"][0].startswith("First Citizen:")  # the mirror
    write(cache / "sources" / "tinyshakespeare" / "input.txt", "a cached copy\n" * 100)
    assert load_corpus(DataConfig()).splits["train"][0].startswith("a cached copy")
    local = write(tmp_path / "mine.txt", "my own text\n" * 100)
    assert load_corpus(DataConfig(path=str(local))).splits["train"][0].startswith("my own text")


def test_a_split_missing_offline_names_the_mirror_variable_and_the_path_option(data_dir: Path):
    with pytest.raises(DataError, match="wikitext-2 \\[train\\]") as e:
        prepare_data(DataConfig(source="wikitext-2", tokenizer="word"))
    assert "LLMMO_DATA_DIR" in str(e.value) and "--data.path" in str(e.value)
    assert "train.txt" in str(e.value)


def test_unknown_source_suggests_the_closest_name():
    with pytest.raises(DataError, match="unknown data source 'wikitext2'; did you mean 'wikitext-2'"):
        prepare_data(DataConfig(source="wikitext2"))


def test_unknown_split_lists_the_splits(shakespeare: Path):
    with pytest.raises(DataError, match="has no split 'test'; its splits are \\['train', 'val'\\]"):
        prepare_data(DataConfig(source="tinyshakespeare", val_split="test"))


def test_pystdlib_is_the_sorted_stdlib_sources_with_every_10th_file_held_out():
    root, files = pystdlib_files()
    rel = [f.relative_to(root).as_posix() for f in files]
    assert rel == sorted(rel) and len(files) > 100
    assert "argparse.py" in rel and not any("site-packages" in r or "/test/" in f"/{r}" for r in rel)
    corpus = load_corpus(DataConfig(source="pystdlib"))
    texts = [f.read_text(encoding="utf-8") for f in files]
    assert corpus.splits["val"] == texts[9::10]
    assert corpus.splits["train"] == [t for i, t in enumerate(texts) if i % 10 != 9]
    assert corpus.source.startswith("pystdlib (")


# -------------------------------------------------------------------------------------------- local text


def test_one_local_document_is_cut_by_characters(tmp_path: Path):
    path = write(tmp_path / "a.txt", "abcdefghij" * 10)
    corpus = load_corpus(DataConfig(path=str(path), val_fraction=0.25))
    assert corpus.splits == {"train": ["abcdefghij" * 7 + "abcde"], "val": ["fghij" + "abcdefghij" * 2]}


def test_a_folder_holds_out_every_kth_document_and_skips_binary_and_hidden_files(tmp_path: Path):
    folder = tmp_path / "docs"
    for i in range(10):
        write(folder / f"sub{i % 2}" / f"{i:02d}.txt", f"doc {i}\n")
    (folder / "image.bin").write_bytes(b"\x89PNG\r\n\x1a\n\0\0\0")
    write(folder / ".git" / "HEAD", "ref: main\n")
    corpus = load_corpus(DataConfig(path=str(folder), val_fraction=0.2))  # k = 5: documents 4 and 9 (sorted)
    order = [f"doc {i}\n" for i in (0, 2, 4, 6, 8, 1, 3, 5, 7, 9)]  # sub0/ sorts before sub1/
    assert corpus.splits["val"] == [order[4], order[9]]
    assert corpus.splits["train"] == [d for i, d in enumerate(order) if i not in (4, 9)]
    assert "10 files; skipped 1 binary file" in corpus.source and "image.bin" in corpus.source


def test_a_glob_and_a_jsonl_file(tmp_path: Path):
    for i in range(3):
        write(tmp_path / f"part{i}.txt", f"part {i}")
    write(tmp_path / "notes.md", "not matched")
    corpus = load_corpus(DataConfig(path=str(tmp_path / "part*.txt")))
    assert corpus.splits == {"train": ["part 0", "part 1"], "val": ["part 2"]}  # fewer than k docs: last is val
    records = [{"body": f"record {i}", "id": i} for i in range(20)]
    path = write(tmp_path / "data.jsonl", "\n".join(json.dumps(r) for r in records) + "\n\n")
    corpus = load_corpus(DataConfig(path=str(path), text_field="body"))
    assert corpus.splits["val"] == ["record 9", "record 19"]
    assert len(corpus.splits["train"]) == 18


def test_documents_are_joined_by_eot_for_bpe_and_eos_for_word_and_newline_for_char(tmp_path: Path):
    folder = tmp_path / "docs"
    for i, text in enumerate(["one two\n", "three", "four five\n", "six"]):
        write(folder / f"{i}.txt", text)
    cfg = DataConfig(path=str(folder), val_fraction=0.5, block_size=2)  # k = 2: train = docs 0 and 2
    bpe = prepare_data(cfg, train_tokenizer("bpe", ["one two three four five six"], 300), splits=("train",))
    assert bpe.tokenizer.decode(bpe.splits["train"].tokens) == f"one two\n{EOT}four five\n{EOT}"
    word = prepare_data(cfg, train_tokenizer("word", ["one two three four five six"], 10), splits=("train",))
    assert word.tokenizer.decode(word.splits["train"].tokens) == "one two <eos> four five <eos>"  # no doubled <eos>
    val = prepare_data(cfg, word.tokenizer, splits=("val",)).splits["val"]
    assert word.tokenizer.decode(val.tokens) == "three <eos> six <eos>"
    char = prepare_data(cfg, train_tokenizer("char", ["one two three four five six\n"]))
    assert char.tokenizer.decode(char.splits["train"].tokens) == "one two\n\nfour five\n"
    assert char.tokenizer.decode(char.splits["val"].tokens) == "three\nsix"
    assert char.splits["val"].n_bytes == len("threesix")  # the bytes of the documents, not of separators


def test_huge_documents_encode_in_pieces_and_batches_to_the_same_ids(tmp_path: Path, monkeypatch):
    from llmmo.data import corpus, tokens

    text = "".join(f"line {i}: some words,  spaced  \n\n  indented {i}\nx\n" for i in range(300))
    assert sum(1 for _ in corpus.pieces(text, 50)) > 100
    monkeypatch.setattr(tokens, "pieces", partial(corpus.pieces, size=50))
    monkeypatch.setattr(tokens, "BATCH_CHARS", 500)
    for kind, vocab_size in (("bpe", 400), ("word", 50), ("char", 0)):
        tokenizer = train_tokenizer(kind, [text], vocab_size)
        split = tokenize_file(write(tmp_path / f"{kind}.txt", text), tokenizer)
        eot = [] if tokenizer.eot_id is None or kind == "word" else [tokenizer.eot_id]  # text ends with "\n"
        assert list(split.tokens) == tokenizer.encode(text) + eot
    # an imported tokenizer's pre-tokenizer may mark the start of every text it is given (Metaspace's "▁"): cut
    # in pieces, a document would not encode to its ids; it is encoded whole
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models, pre_tokenizers, trainers

    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.Metaspace()
    hf.train_from_iterator([text], trainers.BpeTrainer(vocab_size=300, special_tokens=["</s>"]))
    tokenizer = Tokenizer(hf)
    assert tokenizer.kind == "hf" and sum(map(tokenizer.encode, corpus.pieces(text, 50)), []) != tokenizer.encode(text)
    split = tokenize_file(write(tmp_path / "hf.txt", text), tokenizer)
    assert list(split.tokens) == tokenizer.encode(text) + [tokenizer.eot_id]


# ---------------------------------------------------------------------------------------- the token cache


def test_the_token_cache_is_reused_and_keyed_by_text_and_tokenizer(tmp_path: Path, cache: Path):
    path = write(tmp_path / "t.txt", "hello world, hello tokens. " * 40)
    cfg = DataConfig(path=str(path), tokenizer="char", block_size=8)
    first = prepare_data(cfg)
    bin_path = first.splits["train"].path
    assert bin_path.parent.parent == cache / "tokens" and bin_path.name == "train.bin"
    meta = json.loads(bin_path.with_suffix(".json").read_text())
    assert meta == {"n_tokens": len(first.splits["train"]), "dtype": "uint16", "n_bytes": 972}
    mtime = bin_path.stat().st_mtime_ns
    second = prepare_data(cfg)
    assert second.splits["train"].path == bin_path and bin_path.stat().st_mtime_ns == mtime
    assert second.tokenizer.fingerprint == first.tokenizer.fingerprint
    assert len(list((cache / "tokenizers").iterdir())) == 1  # trained once, then loaded
    bpe = prepare_data(DataConfig(path=str(path), tokenizer="bpe", vocab_size=300, block_size=8))
    assert bpe.splits["train"].path != bin_path and bpe.fingerprint != first.fingerprint
    path.write_text("changed text, changed tokens. " * 40, encoding="utf-8")
    changed = prepare_data(cfg)
    assert changed.splits["train"].path != bin_path
    assert changed.tokenizer.decode(changed.splits["train"].tokens).startswith("changed text")
    # new text of the same size under the old modification time (cp -p, rsync -t and tar keep it): not stale
    stat = path.stat()
    path.write_text(path.read_text().replace("changed", "CHANGED"), encoding="utf-8")
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert path.stat().st_size == stat.st_size and path.stat().st_mtime_ns == stat.st_mtime_ns
    copied = prepare_data(cfg)
    assert copied.tokenizer.decode(copied.splits["train"].tokens).startswith("CHANGED text")


def test_a_damaged_cache_entry_is_rebuilt(tmp_path: Path, cache: Path):
    path = write(tmp_path / "t.txt", "some text to cache " * 20)
    cfg = DataConfig(path=str(path), block_size=8)
    first = prepare_data(cfg)
    expected = np.array(first.splits["train"].tokens)
    first.splits["train"].path.write_bytes(b"\0\0")  # truncated
    again = prepare_data(cfg)
    assert np.array_equal(np.array(again.splits["train"].tokens), expected)
    bin_path = again.splits["train"].path
    bin_path.write_bytes(b"\xff" * bin_path.stat().st_size)  # overwritten: ids the tokenizer does not have
    (cache_file,) = (cache / "tokenizers").glob("*.json")
    cache_file.write_text("{not json")
    rebuilt = prepare_data(cfg)
    assert np.array_equal(np.array(rebuilt.splits["train"].tokens), expected)


def test_tokenize_file_for_eval(tmp_path: Path):
    tokenizer = train_tokenizer("char", ["abc\n"])
    path = write(tmp_path / "eval.txt", "abcabc\n")
    split = tokenize_file(path, tokenizer)
    assert list(split.tokens) == tokenizer.encode("abcabc\n") and split.n_bytes == 7
    assert tokenize_file(path, tokenizer).path == split.path
    with pytest.raises(DataError, match="encodes to 1 token; evaluating needs at least 2"):
        tokenize_file(write(tmp_path / "one.txt", "a"), tokenizer)


# ------------------------------------------------------------------------------------------- bad input


def test_a_missing_path(tmp_path: Path):
    with pytest.raises(DataError, match="data.path '.*nope.txt' does not exist; pass an existing text file"):
        prepare_data(DataConfig(path=str(tmp_path / "nope.txt")))
    with pytest.raises(DataError, match="matches no files"):
        prepare_data(DataConfig(path=str(tmp_path / "*.nope")))


def test_an_empty_corpus(tmp_path: Path):
    with pytest.raises(DataError, match="holds no text"):
        prepare_data(DataConfig(path=str(write(tmp_path / "empty.txt", ""))))
    with pytest.raises(DataError, match="split 'train' of .* is empty"):
        prepare_data(DataConfig(path=str(write(tmp_path / "one.txt", "a"))))


def test_a_file_that_is_not_utf8_names_the_byte_offset_and_the_encoding_option(tmp_path: Path):
    path = tmp_path / "latin1.txt"
    path.write_bytes(("déjà vu, café. " * 10).encode("latin-1"))
    with pytest.raises(DataError) as e:
        prepare_data(DataConfig(path=str(path)))
    message = str(e.value)
    assert str(path) in message and "not valid utf-8" in message and "byte 0xe9 at byte offset 1" in message
    assert "--data.encoding" in message
    data = prepare_data(DataConfig(path=str(path), encoding="latin-1", block_size=2))
    assert data.tokenizer.decode(data.splits["train"].tokens) == ("déjà vu, café. " * 10)[:135]


def test_a_binary_file_given_directly(tmp_path: Path):
    path = tmp_path / "blob.txt"
    path.write_bytes(b"abc\0def")
    with pytest.raises(DataError, match="is not a text file \\(a NUL byte at offset 3\\)"):
        prepare_data(DataConfig(path=str(path)))


def test_a_split_shorter_than_a_window_says_how_many_tokens_and_what_to_lower(tmp_path: Path):
    path = write(tmp_path / "short.txt", "x" * 300)
    with pytest.raises(DataError) as e:
        prepare_data(DataConfig(path=str(path), block_size=64))
    message = str(e.value)
    assert "[val] has 30 tokens, but one window needs block_size + 1 = 65" in message
    assert "lower --data.block_size (to at most 29)" in message


def test_bad_jsonl_lines_are_named_by_file_and_line(tmp_path: Path):
    path = write(tmp_path / "d.jsonl", '{"text": "ok"}\n{"text": broken\n')
    with pytest.raises(DataError, match=r"d\.jsonl:2: not valid JSON"):
        prepare_data(DataConfig(path=str(path)))
    path = write(tmp_path / "e.jsonl", '{"text": "ok"}\n\n{"body": "no text field"}\n')
    with pytest.raises(
        DataError, match=r"e\.jsonl:3: no field 'text' \(the record has \['body'\]\); set --data.text_f"
    ):
        prepare_data(DataConfig(path=str(path)))
    path = write(tmp_path / "f.jsonl", '{"text": 3}\n')
    with pytest.raises(DataError, match=r"f\.jsonl:1: field 'text' holds a int, not text"):
        prepare_data(DataConfig(path=str(path)))


def test_json_array_records_are_documents_and_lists_of_lines_are_joined(tmp_path: Path):
    poems = [{"title": "a", "paragraphs": ["床前明月光，", "疑是地上霜。"]}, {"title": "b", "paragraphs": ["一二三。"]}]
    path = write(tmp_path / "poems.json", json.dumps(poems, ensure_ascii=False))
    assert read_documents(path, "utf-8", "paragraphs") == ["床前明月光，\n疑是地上霜。", "一二三。"]
    with pytest.raises(DataError, match=r"poems\.json\[0\]: no field 'text'"):
        read_documents(path, "utf-8", "text")
    write(tmp_path / "obj.json", '{"a": 1}')  # not an array of records (a config file): plain text, as before
    assert read_documents(tmp_path / "obj.json", "utf-8", "text") == ['{"a": 1}']


def test_the_char_alphabet_holds_val_characters_and_other_text_is_named(tmp_path: Path):
    path = write(tmp_path / "t.txt", "ab" * 45 + "abababababz")  # val: the last 11 characters
    data = prepare_data(DataConfig(path=str(path), block_size=4))  # 'z' occurs in val only: it is in the alphabet
    assert data.tokenizer.vocab_size == 4  # a, b, z and the document separator
    other = write(tmp_path / "other.txt", "abq")
    with pytest.raises(DataError, match=r"other\.txt.*characters 'q' are not in"):
        tokenize_file(str(other), data.tokenizer)


# ------------------------------------------------------------------------------------------------ download


@pytest.fixture
def served(tmp_path: Path):
    """A folder served over HTTP on localhost while the test runs."""
    root = tmp_path / "www"
    root.mkdir()

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), partial(Quiet, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def sha256(path: Path) -> str:
    return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()


def add_source(monkeypatch, name: str, files: dict[str, RemoteFile], val_fraction: float = 0.0) -> None:
    """Register a named source for this test only, and allow downloads."""
    monkeypatch.delenv("LLMMO_OFFLINE")
    monkeypatch.setitem(sources.SOURCES, name, NamedSource(name, files, val_fraction))


def test_download_from_a_file_url_is_verified_and_cached(tmp_path: Path, cache: Path, monkeypatch):
    remote = write(tmp_path / "remote" / "input.txt", "downloaded text for a test\n" * 20)
    file = RemoteFile(("input.txt",), remote.as_uri(), sha256(remote))
    add_source(monkeypatch, "tiny", {"train": file, "val": file}, val_fraction=0.1)
    data = prepare_data(DataConfig(source="tiny", block_size=8))
    cached = cache / "sources" / "tiny" / "input.txt"
    assert cached.read_bytes() == remote.read_bytes()
    assert data.tokenizer.decode(data.splits["train"].tokens).startswith("downloaded text")
    remote.unlink()  # the cached copy is found first: no second download
    assert prepare_data(DataConfig(source="tiny", block_size=8)).splits["val"].path == data.splits["val"].path


def test_a_checksum_mismatch_is_an_error_and_leaves_no_file(tmp_path: Path, cache: Path, monkeypatch):
    remote = write(tmp_path / "remote" / "input.txt", "the real text\n" * 20)
    wrong = "sha256:" + "0" * 64
    add_source(monkeypatch, "tiny", {"train": RemoteFile(("input.txt",), remote.as_uri(), wrong)})
    with pytest.raises(DataError) as e:
        prepare_data(DataConfig(source="tiny"))
    message = str(e.value)
    assert "has sha256 " + hashlib.sha256(remote.read_bytes()).hexdigest() in message
    assert "expected " + "0" * 64 in message and "discarded" in message and "LLMMO_DATA_DIR" in message
    folder = cache / "sources" / "tiny"
    assert not folder.exists() or list(folder.iterdir()) == []


def test_a_failed_download_names_the_mirror_variable_and_the_path_option(tmp_path: Path, monkeypatch):
    missing = (tmp_path / "nowhere.txt").as_uri()
    add_source(monkeypatch, "tiny", {"train": RemoteFile(("input.txt",), missing, "sha256:" + "0" * 64)})
    with pytest.raises(DataError, match="could not download .*nowhere.txt.*LLMMO_DATA_DIR.*--data.path"):
        prepare_data(DataConfig(source="tiny"))


def test_download_over_http_extracts_only_the_zip_member_a_split_needs(served, cache: Path, monkeypatch):
    root, url = served
    with zipfile.ZipFile(root / "corpus-v1.zip", "w") as z:
        z.writestr("corpus/wiki.train.tokens", "train words here\n" * 50)
        z.writestr("corpus/wiki.valid.tokens", "valid words here\n" * 50)
    checksum = sha256(root / "corpus-v1.zip")
    files = {
        s: RemoteFile((f"wiki.{s}.tokens", f"{s}.txt"), f"{url}/corpus-v1.zip", checksum, f"corpus/wiki.{s}.tokens")
        for s in ("train", "valid")
    }
    add_source(monkeypatch, "corpus", files)
    cfg = DataConfig(source="corpus", tokenizer="word", train_split="valid", val_split="valid", block_size=8)
    data = prepare_data(cfg)
    assert data.tokenizer.decode(data.splits["valid"].tokens[:3]) == "valid words here"
    assert (cache / "downloads" / "corpus-v1.zip").is_file()
    assert [p.name for p in (cache / "sources" / "corpus").iterdir()] == ["wiki.valid.tokens"]
    (root / "corpus-v1.zip").unlink()  # train comes out of the archive already in the cache
    train = prepare_data(cfg, data.tokenizer, splits=("train",)).splits["train"]
    assert data.tokenizer.decode(train.tokens[:3]) == "<unk> words here"  # the vocabulary is valid's


# ------------------------------------------------------------------------------------------------ samplers


def counting_tokens(n: int) -> np.ndarray:
    return np.arange(n, dtype=np.uint32)  # token i is i: a window's first token is its offset


def test_random_windows_are_shifted_pairs_and_a_function_of_seed_step_micro_rank():
    tokens = counting_tokens(10_000)
    sampler = RandomWindows(tokens, block_size=16, batch_size=8, seed=3)
    x, y = sampler.batch(5)
    assert x.shape == y.shape == (8, 16) and x.dtype == y.dtype == torch.int64
    assert torch.equal(y, x + 1) and torch.equal(x, x[:, :1] + torch.arange(16))  # real consecutive windows
    assert int(y.max()) < len(tokens)
    assert torch.equal(RandomWindows(tokens, 16, 8, seed=3).batch(5)[0], x)  # a fresh sampler: the same batch
    others = [
        RandomWindows(tokens, 16, 8, seed=4).batch(5)[0],
        sampler.batch(6)[0],
        RandomWindows(tokens, 16, 8, seed=3, grad_accum=2).batch(5, micro=1)[0],
        RandomWindows(tokens, 16, 8, seed=3, rank=1, world_size=2).batch(5)[0],
    ]
    assert all(not torch.equal(o, x) for o in others)


def test_random_windows_reach_the_last_token():
    tokens = counting_tokens(20)
    sampler = RandomWindows(tokens, block_size=19, batch_size=4, seed=0)
    x, y = sampler.batch(0)
    assert torch.equal(x[0], torch.arange(19)) and torch.equal(y[0], torch.arange(1, 20))


def test_epoch_windows_visit_every_window_once_per_epoch_across_ranks_and_micro_batches():
    tokens, block, batch, accum, ranks = counting_tokens(8 * 100 + 1), 8, 3, 2, 2
    samplers = [
        EpochWindows(tokens, block, batch, seed=1, rank=r, world_size=ranks, grad_accum=accum) for r in range(2)
    ]
    s = samplers[0]
    assert s.n_windows == 100 and s.steps_per_epoch == 16 and s.optimizer_steps_per_epoch == 8
    epochs = []
    for epoch in range(2):
        starts = []
        for step in range(epoch * 8, epoch * 8 + 8):
            for sampler in samplers:
                for micro in range(accum):
                    x, y = sampler.batch(step, micro)
                    assert torch.equal(y, x + 1) and torch.equal(x, x[:, :1] + torch.arange(block))
                    starts += x[:, 0].tolist()
        assert len(starts) == len(set(starts)) == 96  # 100 windows, 4 left over for 2 ranks x 2 micro x 3 rows
        assert all(start % block == 0 for start in starts)
        epochs.append(starts)
    assert epochs[0] != epochs[1]  # a new permutation each epoch
    fresh = EpochWindows(tokens, block, batch, seed=1, rank=1, world_size=ranks, grad_accum=accum)
    assert torch.equal(fresh.batch(11, 1)[0], samplers[1].batch(11, 1)[0])  # resuming mid-run: the same batch
    with pytest.raises(ValueError, match="micro-batch 2 is not in"):
        s.batch(0, 2)
    with pytest.raises(ValueError, match="micro-batch 1 is not in .* pass grad_accum to the sampler"):
        RandomWindows(tokens, block, batch, seed=1).batch(0, 1)


def test_epoch_windows_need_enough_windows_for_one_step():
    with pytest.raises(DataError, match="10 windows of 8 tokens, fewer than the 12 .*lower --train.batch_size"):
        EpochWindows(counting_tokens(81), block_size=8, batch_size=6, seed=0, grad_accum=2)


@settings(max_examples=60, deadline=None)
@given(n=st.integers(0, 300), block=st.integers(1, 40), batch=st.integers(1, 7))
def test_eval_windows_predict_every_token_after_the_first_exactly_once(n: int, block: int, batch: int):
    tokens = counting_tokens(n)
    targets = []
    for x, y in eval_windows(tokens, block, batch):
        assert x.shape == y.shape and x.shape[1] == block and 1 <= x.shape[0] <= batch
        real = y >= 0
        assert torch.equal(y[real], x[real] + 1)  # each target follows its input
        assert torch.all(y[~real] == -1)
        targets += y[real].tolist()
    assert targets == list(range(1, n))


def test_eval_windows_stop_after_max_batches():
    batches = list(eval_windows(counting_tokens(1000), block_size=10, batch_size=4, max_batches=3))
    assert len(batches) == 3 and batches[-1][0][-1, 0] == 110
