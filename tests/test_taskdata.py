"""Task data: SST-2 and GSM8K read as they are, and bad rows named with file and line."""

from __future__ import annotations

from pathlib import Path

import pytest

from llmmo.errors import DataError
from llmmo.finetune.taskdata import read_conversations, read_labelled


def test_sst2_dev_reads_with_its_header_and_labels(data_dir: Path) -> None:
    dev = read_labelled(data_dir / "sst2" / "dev.tsv", text_field="sentence")
    assert len(dev.texts) == 872 and dev.names == ["0", "1"] and not dev.skipped
    assert set(dev.labels) == {0, 1} and all(t.strip() for t in dev.texts)
    with pytest.raises(DataError, match=r"no 'sentence' and 'label' fields \(it has \['index', 'sentence'\]\)"):
        read_labelled(data_dir / "sst2" / "test.tsv", text_field="sentence")  # unlabelled


def test_gsm8k_reads_as_one_turn_conversations(data_dir: Path) -> None:
    train = read_conversations(data_dir / "gsm8k" / "train.jsonl", prompt_field="question", response_field="answer")
    assert len(train.conversations) == 7473
    first = train.conversations[0]
    assert [m["role"] for m in first] == ["user", "assistant"] and first[1]["content"].endswith("#### 72")


def test_bad_rows_are_named_and_skipped_only_when_asked(tmp_path: Path) -> None:
    f = tmp_path / "reviews.csv"
    f.write_text('text,label\n"good, really",pos\n,neg\n"fine",\n"bad",neg\n"odd",maybe\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"reviews.csv:3: empty text \(and 1 more\); .* --skip-bad-rows"):
        read_labelled(f)
    kept = read_labelled(f, skip_bad_rows=True)
    assert kept.texts == ["good, really", "bad", "odd"] and kept.names == ["maybe", "neg", "pos"]
    assert [s.split(": ", 1)[1] for s in kept.skipped] == ["empty text", "missing 'label'"]
    # with a checkpoint's label names, another label is a bad row
    known = read_labelled(f, names=["neg", "pos"], skip_bad_rows=True)
    assert known.labels == [1, 0] and known.skipped[-1].endswith(
        "reviews.csv:6: label 'maybe' is not one of ['neg', 'pos']"
    )


def test_jsonl_labels_conversations_and_encodings(tmp_path: Path) -> None:
    f = tmp_path / "d.jsonl"
    f.write_text('{"text": "a", "label": 1}\nnot json\n{"text": "b", "label": 0}\n', encoding="utf-8")
    with pytest.raises(DataError, match="d.jsonl:2: not JSON"):
        read_labelled(f)
    assert read_labelled(f, skip_bad_rows=True).labels == [1, 0]
    chat = tmp_path / "chat.jsonl"
    chat.write_text(
        '{"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},'
        ' {"role": "assistant", "content": "hello"}]}\n'
        '{"messages": [{"role": "user", "content": "unanswered"}]}\n'
        '{"prompt": "2+2?", "response": "4"}\n'
    )
    got = read_conversations(chat, skip_bad_rows=True)
    assert len(got.conversations) == 2 and got.conversations[0][0] == {"role": "system", "content": "be brief"}
    assert got.skipped == [f"{chat}:2: the conversation does not end with an assistant message (nothing to learn)"]
    latin = tmp_path / "latin.tsv"
    latin.write_bytes("text\tlabel\ncaf\xe9\t1\n".encode("latin-1"))
    with pytest.raises(DataError, match="not valid utf-8 .* --encoding"):
        read_labelled(latin)
    assert read_labelled(latin, encoding="latin-1").texts == ["café"]
    with pytest.raises(DataError, match="does not exist"):
        read_labelled(tmp_path / "missing.tsv")
