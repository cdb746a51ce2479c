"""Task data: labelled text (TSV, CSV, JSONL) for classification, conversations (JSONL) for instruction tuning.

Bad rows (a missing field, empty text, a label outside the known set, a malformed conversation) are named with
file and line. By default the first one stops the read, with the count of all of them; `skip_bad_rows` keeps
going and reports what it skipped instead.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmmo.errors import DataError

ROLES = ("system", "user", "assistant")


@dataclass
class Labelled:
    texts: list[str]
    labels: list[int]  # ids into `names`
    names: list[str]  # label names; a checkpoint stores them so that ids mean the same thing later
    skipped: list[str] = field(default_factory=list)  # "file:line: why" of each row skipped


@dataclass
class Conversations:
    conversations: list[list[dict[str, str]]]  # each a list of {"role", "content"}, ending with the assistant
    skipped: list[str] = field(default_factory=list)


def _read_text(path: str | Path, encoding: str) -> str:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"task file '{path}' does not exist; pass a .tsv, .csv or .jsonl file")
    try:
        return path.read_text(encoding=encoding)
    except UnicodeDecodeError as e:
        raise DataError(
            f"'{path}' is not valid {encoding} (byte {e.start}); pass its encoding with --encoding (e.g. latin-1)"
        ) from None
    except LookupError:
        raise DataError(f"unknown --encoding '{encoding}'; use a Python codec name such as utf-8 or latin-1") from None


def _rows(path: str | Path, text: str) -> list[tuple[int, dict[str, Any]]]:
    """(line number, record) pairs; delimited files need a header row that names the columns."""
    suffix = Path(path).suffix.lower()
    if suffix in (".jsonl", ".json"):
        rows = []
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                record = {"__error__": f"not JSON ({e.msg})"}
            rows.append((number, record if isinstance(record, dict) else {"__error__": "not a JSON object"}))
        return rows
    if suffix not in (".tsv", ".csv"):
        raise DataError(f"'{path}' is neither .tsv, .csv nor .jsonl; rename it or convert it")
    reader = csv.DictReader(io.StringIO(text), delimiter="\t" if suffix == ".tsv" else ",", quoting=csv.QUOTE_MINIMAL)
    return [(reader.line_num, row) for row in reader]


def _bad(problems: list[str], path: str | Path, skip: bool, what: str) -> None:
    if problems and not skip:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise DataError(f"{problems[0]}{more}; fix the {what} or pass --skip-bad-rows to leave such rows out")


def read_labelled(
    path: str | Path,
    text_field: str = "text",
    label_field: str = "label",
    names: list[str] | None = None,
    encoding: str = "utf-8",
    skip_bad_rows: bool = False,
) -> Labelled:
    """Text and label of each row. Without `names`, the labels found become the names (sorted, numbers in
    numeric order); with them (a checkpoint's), any other label is a bad row."""
    rows = _rows(path, _read_text(path, encoding))
    if rows and not any(text_field in r and label_field in r for _, r in rows):
        first = sorted(k for k in rows[0][1] if k != "__error__")
        raise DataError(
            f"'{path}' has no '{text_field}' and '{label_field}' fields (it has {first}); name them with "
            "--text-field and --label-field (llmmo eval --task: --prompt-field and --reference-field)"
        )
    kept, problems = [], []
    for number, r in rows:
        text, label = r.get(text_field), r.get(label_field)
        why = r.get("__error__")
        if why is None and (text is None or label is None or not str(label).strip()):
            why = f"missing '{text_field if text is None else label_field}'"
        elif why is None and not str(text).strip():
            why = "empty text"
        elif why is None and names is not None and str(label) not in names:
            why = f"label {label!r} is not one of {names}"
        if why:
            problems.append(f"{path}:{number}: {why}")
            continue
        kept.append((str(text), str(label)))
    _bad(problems, path, skip_bad_rows, "rows")
    if names is None:
        found = {label for _, label in kept}
        numeric = all(x.lstrip("-").isdigit() for x in found)
        names = sorted(found, key=lambda x: (int(x) if numeric else 0, x))
    index = {name: i for i, name in enumerate(names)}
    return Labelled([t for t, _ in kept], [index[label] for _, label in kept], list(names), problems)


def read_conversations(
    path: str | Path,
    prompt_field: str = "prompt",
    response_field: str = "response",
    encoding: str = "utf-8",
    skip_bad_rows: bool = False,
) -> Conversations:
    """Conversations from JSONL: {"messages": [{"role", "content"}, ...]} rows, or prompt/response rows (the
    field names by option, e.g. GSM8K's question/answer), each a one-turn conversation."""
    if Path(path).suffix.lower() not in (".jsonl", ".json"):
        raise DataError(f"conversations are read from JSONL; '{path}' is not a .jsonl file")
    conversations, problems = [], []
    for number, r in _rows(path, _read_text(path, encoding)):
        why = r.get("__error__")
        if why is None and "messages" in r:
            messages = r["messages"]
            if not isinstance(messages, list) or not messages:
                why = "'messages' is not a non-empty list"
            elif any(not isinstance(m, dict) or m.get("role") not in ROLES or not str(m.get("content", "")).strip()
                     for m in messages):  # fmt: skip
                why = f"every message needs a role among {list(ROLES)} and non-empty content"
            elif messages[-1]["role"] != "assistant":
                why = "the conversation does not end with an assistant message (nothing to learn)"
            else:
                conversations.append([{"role": m["role"], "content": str(m["content"])} for m in messages])
                continue
        elif why is None:
            prompt, response = r.get(prompt_field), r.get(response_field)
            if prompt is None or response is None:
                why = f"neither 'messages' nor '{prompt_field}' and '{response_field}'"
            elif not str(prompt).strip() or not str(response).strip():
                why = "empty prompt or response"
            else:
                conversations.append(
                    [{"role": "user", "content": str(prompt)}, {"role": "assistant", "content": str(response)}]
                )
                continue
        problems.append(f"{path}:{number}: {why}")
    _bad(problems, path, skip_bad_rows, "rows")
    return Conversations(conversations, problems)
