"""Fine-tuning: the chat template and its loss mask, classification and QA heads, LoRA fine-tunes, the task
metrics, and the commands (finetune, classify, chat, eval --task) on slices of the shared data."""

from __future__ import annotations

import dataclasses
import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch

from llmmo import cli
from llmmo.checkpoint import load_checkpoint, save_checkpoint
from llmmo.config import DataConfig, ModelConfig, resolve_model
from llmmo.errors import CheckpointError, ConfigError, DataError, DivergedError
from llmmo.finetune.chat import CHAT_TOKENS, END, add_chat_tokens, encode_chat, pack, render, resize_vocab
from llmmo.finetune.lora import LoraConfig
from llmmo.finetune.metrics import (
    classification_scores,
    confusion_matrix,
    extract_final_number,
    squad_exact,
    squad_f1,
)
from llmmo.finetune.predict import TextClassifier
from llmmo.finetune.tuner import ClassifyTuner, FinetuneConfig, SFTTuner, finetune_defaults
from llmmo.model import Transformer
from llmmo.tokenizer import Tokenizer, char_tokenizer, train_tokenizer

CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is 2 + 2?"},
    {"role": "assistant", "content": "4"},
    {"role": "user", "content": "And 3 + 3?"},
    {"role": "assistant", "content": "It is 6."},
]


def tiny_model(vocab: int, block: int = 64, family: str = "gpt2") -> Transformer:
    torch.manual_seed(0)
    cfg = ModelConfig(family=family, n_layer=2, n_head=2, n_embd=64, vocab_size=vocab, block_size=block)
    return Transformer(resolve_model(cfg))


def save_base(path: Path, tokenizer: Tokenizer, block: int = 64, family: str = "gpt2") -> Path:
    save_checkpoint(path, tiny_model(tokenizer.vocab_size, block, family), tokenizer, DataConfig(block_size=block))
    return path


# ------------------------------------------------------------------------------------------ chat template


@pytest.mark.parametrize("kind", ["char", "bpe"])
def test_loss_mask_covers_exactly_the_assistant_tokens(kind: str) -> None:
    text = "".join(m["content"] for m in CHAT)
    tokenizer = train_tokenizer(kind, [text], 300).with_special_tokens(CHAT_TOKENS)
    ids, learn = encode_chat(tokenizer, CHAT)
    assert ids == tokenizer.encode(render(CHAT))  # the marked ids are the rendered text's ids
    learned = [i for i, flag in zip(ids, learn, strict=True) if flag]
    end = tokenizer.encode(END)
    expected = tokenizer.encode("4") + end + tokenizer.encode("It is 6.") + end
    assert learned == expected
    # packed for training, the targets are the learned tokens and nothing else
    x, y, cut, dropped = pack([(ids, learn)], block_size=len(ids) - 1)
    assert cut == dropped == 0 and x.shape == (1, len(ids) - 1)
    assert [t for t in y[0] if t >= 0] == expected
    assert (x[0] == ids[:-1]).all()


def test_pack_keeps_examples_whole_and_cuts_long_ones() -> None:
    examples = [
        ([1, 2, 3], [False, True, True]),
        ([4, 5, 6, 7], [False, False, True, True]),
        (list(range(20)), [True] * 20),
        ([9] * 12, [False] * 10 + [True] * 2),  # its reply lies past the cut: nothing left to learn
    ]
    x, y, cut, dropped = pack(examples, block_size=7)
    assert cut == 2 and dropped == 1 and len(x) == 2  # the 20- and 12-token examples are cut to 8
    assert x[0].tolist() == [1, 2, 3, 4, 5, 6, 0] and y[0].tolist() == [2, 3, -1, -1, 6, 7, -1]
    assert x[1].tolist() == list(range(7)) and y[1].tolist() == list(range(1, 8))


def test_chinese_chat_round_trips_with_a_char_tokenizer(data_dir: Path) -> None:
    poems = json.loads((data_dir / "chinese-poetry" / "poet.tang.0.json").read_text(encoding="utf-8"))
    text = "".join("".join(p["paragraphs"]) for p in poems[:300])
    tokenizer = char_tokenizer([text]).with_special_tokens(CHAT_TOKENS)
    messages = [{"role": "user", "content": text[:12]}, {"role": "assistant", "content": text[12:40]}]
    ids, _ = encode_chat(tokenizer, messages)
    assert tokenizer.decode(ids) == render(messages)  # exact, markers and all
    assert len(ids) == 12 + 28 + 4  # one id per character, one per marker


def test_added_chat_tokens_grow_the_model_and_keep_its_logits() -> None:
    tokenizer = char_tokenizer(["abc d"])
    for family in ("gpt2", "llama"):  # tied and untied output heads
        model = tiny_model(tokenizer.vocab_size, family=family).eval()
        x = torch.tensor([tokenizer.encode("abc d")])
        before = model(x)[0]
        chat = add_chat_tokens(model, tokenizer)
        assert chat.vocab_size == tokenizer.vocab_size + 4 == model.cfg.vocab_size
        after = model(x)[0]
        torch.testing.assert_close(after[..., : tokenizer.vocab_size], before, rtol=0, atol=1e-6)  # a wider matmul
        assert model.lm_head.weight.shape[0] == chat.vocab_size
        if family == "gpt2":
            assert model.lm_head.weight is model.tok_emb.weight
    resize_vocab(model, 3)  # never shrinks
    assert model.cfg.vocab_size == chat.vocab_size


def test_markers_in_content_are_refused() -> None:
    with pytest.raises(DataError, match="chat marker"):
        render([{"role": "user", "content": "hi <|end|>"}])
    with pytest.raises(ConfigError, match="role"):
        render([{"role": "robot", "content": "hi"}])


def test_chat_session_drops_the_oldest_turns_to_fit_and_keeps_the_system_message() -> None:
    from llmmo.finetune.chat import ChatSession
    from llmmo.generate import GenerationConfig

    tokenizer = char_tokenizer(["abcdefghij xyz."]).with_special_tokens(CHAT_TOKENS)
    model = tiny_model(tokenizer.vocab_size, block=64).eval()
    session = ChatSession(model, tokenizer, GenerationConfig(max_new_tokens=8, temperature=0.0), system="xyz.")
    for _ in range(6):
        reply = "".join(session.send("abcdefghij" * 2))
        assert "<|" not in reply
        ids = session.prompt_ids()
        assert len(ids) <= 64 - 8  # room left for a reply
    assert session.dropped > 0 and session.history[0]["role"] == "user"
    assert tokenizer.decode(ids).startswith("<|system|>xyz.<|end|>")  # the system message stays
    session.reset()
    assert session.history == [] and session.dropped == 0
    with pytest.raises(DataError, match="not in this char tokenizer's vocabulary"):
        "".join(session.send("ABC"))  # characters a char model cannot read
    assert session.history == []  # the refused message did not join the conversation
    "".join(session.send("abc"))
    assert [m["role"] for m in session.history] == ["user", "assistant"] and session.history[0]["content"] == "abc"
    with pytest.raises(ConfigError, match="not instruction-tuned"):
        ChatSession(model, char_tokenizer(["abc"]), GenerationConfig())


def test_example_batches_share_one_global_batch_and_cover_an_epoch() -> None:
    from llmmo.finetune.batches import ExampleBatches

    rng = np.random.default_rng(0)
    inputs = [list(range(1, int(n) + 1)) for n in rng.integers(1, 30, size=103)]
    targets = np.arange(103)
    one = ExampleBatches(inputs, targets, batch_size=8, seed=3)
    two = [ExampleBatches(inputs, targets, batch_size=4, seed=3, rank=r, world_size=2) for r in range(2)]
    seen = []
    for step in range(one.optimizer_steps_per_epoch):
        x, y = one.batch(step)
        halves = [b.batch(step) for b in two]
        assert torch.equal(y, torch.cat([h[1] for h in halves]))  # 2 ranks of 4 = 1 process of 8
        lengths = (x >= 0).sum(1)
        assert x.shape[1] == lengths.max()  # padded only to the batch's own longest example
        assert all(x[i, : lengths[i]].tolist() == inputs[int(y[i])] for i in range(len(y)))
        seen += y.tolist()
    assert len(set(seen)) == len(seen) == 96  # each example at most once; 7 left over sit the epoch out
    assert one.batch(one.optimizer_steps_per_epoch)[1].tolist() != one.batch(0)[1].tolist()  # a new order


# ------------------------------------------------------------------------------------------- metrics


def test_squad_metric_matches_hand_checked_values() -> None:
    # values worked out by hand with the official v1.1 script's rules
    assert squad_exact("the Denver Broncos", ["Denver Broncos"]) == 1.0  # articles and case dropped
    assert squad_exact("Denver Broncos!", ["Carolina Panthers", "denver broncos"]) == 1.0  # best reference
    assert squad_f1("Broncos won", ["Denver Broncos"]) == pytest.approx(0.5)  # P 1/2, R 1/2
    assert squad_f1("in 1990.", ["1990"]) == pytest.approx(2 / 3)  # P 1/2, R 1
    assert squad_f1("a", ["the"]) == 0.0  # both normalise to nothing: no common token
    assert squad_f1("Zürich", ["Zürich, Switzerland"]) == pytest.approx(2 / 3)  # P 1, R 1/2: words, as official
    assert squad_f1("café", ["cafés"]) == 0.0
    assert squad_f1("北京大学", ["北京"]) == pytest.approx(2 / 3)  # CJK by character (MLQA): P 2/4, R 2/2


def test_classification_scores_and_gsm8k_extraction() -> None:
    confusion = confusion_matrix([0, 0, 1, 1, 2], [0, 1, 1, 1, 0], 3)
    assert confusion.tolist() == [[1, 1, 0], [0, 2, 0], [1, 0, 0]]
    scores = classification_scores(confusion)
    assert scores["accuracy"] == pytest.approx(3 / 5)
    assert scores["macro_f1"] == pytest.approx((0.5 + 0.8 + 0.0) / 3)  # F1 per label: 2/4, 4/5, 0
    assert extract_final_number("so 3 + 4 = 7\n#### 7") == "7"
    assert extract_final_number("#### 1,234.5 ") == "1234.5"
    assert extract_final_number("the answer is 7") is None
    assert extract_final_number("#### 7 apples") is None  # must end in the number


# ------------------------------------------------------------------------------------- classification


@pytest.fixture(scope="module")
def sst2_slice(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("sst2")
    lines = (data_dir / "sst2" / "train.tsv").read_text(encoding="utf-8").splitlines()
    (root / "train.tsv").write_text("\n".join(lines[:3001]) + "\n", encoding="utf-8")
    dev = (data_dir / "sst2" / "dev.tsv").read_text(encoding="utf-8").splitlines()
    (root / "dev.tsv").write_text("\n".join(dev[:301]) + "\n", encoding="utf-8")
    texts = [line.split("\t")[0] for line in lines[1:3001]]
    base = save_base(root / "base", train_tokenizer("bpe", texts, 1000))
    return {"root": root, "train": root / "train.tsv", "dev": root / "dev.tsv", "base": base}


def finetune_classify(sst2: dict[str, Path], out: Path, *extra: str) -> int:
    return cli.main(
        ["finetune", "classify", str(sst2["base"]), "--train-file", str(sst2["train"]), "--eval-file", str(sst2["dev"]),
         "--text-field", "sentence", "--train.out_dir", str(out), "--train.epochs", "2", "--train.lr", "2e-3",
         "--train.eval_every", "1000", *extra]
    )  # fmt: skip


def test_classifier_learns_sentiment(sst2_slice: dict[str, Path], tmp_path: Path, capsys, monkeypatch) -> None:
    assert finetune_classify(sst2_slice, tmp_path / "run", "--pooling", "mean") == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    # 3,000 training phrases, 2 epochs of a fresh 2-layer model: well above the 50% of chance on balanced dev
    assert summary["val_accuracy"] >= 0.6, summary
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["train_loss"] for r in records if "train_loss" in r]
    assert np.mean(losses[-3:]) < np.mean(losses[:3]) - 0.05  # the loss falls on real text
    confusion = np.array(summary["val_confusion"])
    assert confusion.sum() == 300 and confusion.shape == (2, 2)

    ckpt = tmp_path / "run" / "ckpt-latest"
    assert load_checkpoint(ckpt).task["labels"] == ["0", "1"]
    capsys.readouterr()
    assert cli.main(["classify", str(ckpt), "a gorgeous , witty , seductive movie .", "--json"]) == 0
    row = json.loads(capsys.readouterr().out)
    assert row["label"] in ("0", "1") and sum(row["probabilities"].values()) == pytest.approx(1.0)
    monkeypatch.setattr("sys.stdin", io.StringIO("a gorgeous , witty , seductive movie .\n\nan ugly mess .\n"))
    assert cli.main(["classify", str(ckpt)]) == 0  # one text per line from stdin, blank lines skipped
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and lines[0].split("\t")[0] == row["label"] and lines[1].endswith("an ugly mess .")
    # the command's labels are those of the fine-tune's own evaluation
    dev = [line.split("\t")[0] for line in sst2_slice["dev"].read_text().splitlines()[1:]]
    predicted = [p.label for p in TextClassifier.load(ckpt).predict(dev)]
    truth = [line.split("\t")[1] for line in sst2_slice["dev"].read_text().splitlines()[1:]]
    accuracy = np.mean([p == t for p, t in zip(predicted, truth, strict=True)])
    assert accuracy == pytest.approx(summary["val_accuracy"])
    capsys.readouterr()
    assert cli.main(["eval", str(ckpt), "--task", "classify", "--file", str(sst2_slice["dev"]), "--prompt-field",
                     "sentence"]) == 0  # fmt: skip
    scores = json.loads(capsys.readouterr().out)
    assert scores["accuracy"] == pytest.approx(accuracy) and scores["confusion"] == summary["val_confusion"]


def frozen_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items() if ".lora_" not in k and not k.endswith(".rows")}


def test_lora_classifier_trains_and_saves_adapters_and_head_only(sst2_slice: dict[str, Path], tmp_path: Path) -> None:
    cfg = finetune_defaults()
    cfg.train.out_dir, cfg.train.epochs, cfg.train.lr = str(tmp_path / "lora"), 2, 2e-3
    lora = LoraConfig(r=4, targets=["attn.qkv", "mlp.up"])
    ft = FinetuneConfig("classify", str(sst2_slice["train"]), str(sst2_slice["dev"]), text_field="sentence", lora=lora)
    tuner = ClassifyTuner(cfg, ft, sst2_slice["base"])
    trainable = {n for n, p in tuner.model.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in tuner.model.named_parameters() if ".lora_" in n or n.startswith("head.")}
    before = frozen_state(tuner.model.backbone)
    result = tuner.run()
    after = frozen_state(tuner.model.backbone)
    assert all(torch.equal(before[k], after[k]) for k in before)  # the base weights never moved
    adapter = tmp_path / "lora" / "ckpt-latest"
    base_bytes = (sst2_slice["base"] / "model.safetensors").stat().st_size
    assert (adapter / "adapter.safetensors").stat().st_size < 0.05 * base_bytes
    # the adapter folder loads as a checkpoint of base + adapters + head, which labels as the run evaluated
    classifier = TextClassifier.load(adapter)
    dev = [line.split("\t") for line in sst2_slice["dev"].read_text().splitlines()[1:]]
    predicted = [p.label for p in classifier.predict([t for t, _ in dev])]
    accuracy = np.mean([p == label for p, (_, label) in zip(predicted, dev, strict=True)])
    assert accuracy == pytest.approx(result.last_eval["val_accuracy"])


def test_classify_refuses_what_it_cannot_use(sst2_slice: dict[str, Path], tmp_path: Path, capsys) -> None:
    assert cli.main(["classify", str(sst2_slice["base"]), "text"]) == 2
    assert "no task head" in capsys.readouterr().err
    bad = tmp_path / "bad.tsv"
    bad.write_text("sentence\tlabel\ngood\t1\n\t0\nbad\n", encoding="utf-8")
    code = cli.main(["finetune", "classify", str(sst2_slice["base"]), "--train-file", str(bad), "--text-field",
                     "sentence", "--train.out_dir", str(tmp_path / "x")])  # fmt: skip
    assert code == 2 and "bad.tsv:3" in capsys.readouterr().err


# ------------------------------------------------------------------------------------- sft, chat, tasks


@pytest.fixture(scope="module")
def sft_run(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A small bpe model instruction-tuned on 400 GSM8K problems."""
    root = tmp_path_factory.mktemp("sft")
    lines = (data_dir / "gsm8k" / "train.jsonl").read_text(encoding="utf-8").splitlines()[:400]
    (root / "train.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    test = (data_dir / "gsm8k" / "test.jsonl").read_text(encoding="utf-8").splitlines()[:8]
    (root / "test.jsonl").write_text("\n".join(test) + "\n", encoding="utf-8")
    rows = [json.loads(x) for x in lines]
    tokenizer = train_tokenizer("bpe", [r["question"] + "\n" + r["answer"] for r in rows], 800)
    base = save_base(root / "base", tokenizer, block=256, family="llama")
    code = cli.main(
        ["finetune", "sft", str(base), "--train-file", str(root / "train.jsonl"), "--prompt-field", "question",
         "--response-field", "answer", "--train.out_dir", str(root / "run"), "--train.epochs", "3",
         "--train.batch_size", "8", "--train.lr", "3e-3", "--train.eval_every", "1000"]
    )  # fmt: skip
    assert code == 0
    return {"root": root, "ckpt": root / "run" / "ckpt-latest", "test": root / "test.jsonl"}


def test_sft_learns_the_answers(sft_run: dict[str, Path]) -> None:
    records = [json.loads(x) for x in (sft_run["root"] / "run" / "metrics.jsonl").read_text().splitlines()]
    evals = [r["val_loss"] for r in records if "val_loss" in r]
    assert evals[-1] < evals[0] - 0.3  # held-out answers become more likely
    ckpt = load_checkpoint(sft_run["ckpt"])
    assert ckpt.task["kind"] == "sft"
    assert all(ckpt.tokenizer.hf.token_to_id(t) is not None for t in CHAT_TOKENS)


def test_chat_prompt_mode_and_eval_task(sft_run: dict[str, Path], capsys, tmp_path: Path) -> None:
    code = cli.main(["chat", str(sft_run["ckpt"]), "--prompt", "Tom has 3 apples.", "--prompt", "How many now?",
                     "--temperature", "0", "--max-new-tokens", "40"])  # fmt: skip
    assert code == 0
    replies = capsys.readouterr().out.splitlines()
    assert len([r for r in replies if r.strip()]) >= 1 and not any("<|" in r for r in replies)
    code = cli.main(["eval", str(sft_run["ckpt"]), "--task", "gsm8k", "--file", str(sft_run["test"]),
                     "--max-new-tokens", "60", "--examples", str(tmp_path / "ex.jsonl")])  # fmt: skip
    assert code == 0
    scores = json.loads(capsys.readouterr().out)
    assert scores["n"] == 8 and 0 <= scores["accuracy"] <= scores["format_rate"] <= 1
    examples = [json.loads(x) for x in (tmp_path / "ex.jsonl").read_text().splitlines()]
    assert len(examples) == 8 and all("reply" in e for e in examples)
    pairs = tmp_path / "pairs.jsonl"  # translation-style prompt/response pairs, scored by sacrebleu
    pairs.write_text("".join(json.dumps({"prompt": f"Say {w}.", "response": w}) + "\n" for w in ("five", "six")))
    for metric in ("chrf", "bleu"):
        assert cli.main(["eval", str(sft_run["ckpt"]), "--task", metric, "--file", str(pairs), "--max-new-tokens",
                         "8"]) == 0  # fmt: skip
        scores = json.loads(capsys.readouterr().out)
        assert scores["n"] == 2 and 0 <= scores[metric] <= 100


def test_a_step_weighs_every_target_alike_however_its_batch_is_split(sft_run: dict[str, Path], tmp_path: Path) -> None:
    """Replies differ in length. A step of two micro-batches has the loss and gradient of the mean over all its
    targets, not the mean of the two micro-batches' means (which would weigh the shorter replies' tokens more)."""
    train = str(sft_run["root"] / "train.jsonl")
    cfg = finetune_defaults()
    cfg.train.out_dir, cfg.train.max_steps, cfg.train.epochs = str(tmp_path / "run"), 1, 0
    cfg.train.batch_size, cfg.train.grad_accum = 1, 2
    tuner = SFTTuner(
        cfg, FinetuneConfig("sft", train, prompt_field="question", response_field="answer"), sft_run["root"] / "base"
    )
    batches = [tuner.sampler.batch(0, micro) for micro in range(2)]
    targets = [int((y >= 0).sum()) for _, y in batches]
    assert targets[0] != targets[1]  # so the mean of the two means is not the mean
    mean = sum(tuner.compute_loss(x, y) * n for (x, y), n in zip(batches, targets, strict=True)) / sum(targets)
    mean.backward()
    gradient_norm = torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in tuner.model.parameters()]))
    tuner.optimizer.zero_grad(set_to_none=True)
    record = tuner.train_step()
    assert record["train_loss"] == pytest.approx(mean.item(), rel=1e-6)
    assert record["grad_norm"] == pytest.approx(gradient_norm.item(), rel=1e-5)


def test_a_fine_tune_into_an_existing_run_is_refused_without_offering_resume(sft_run: dict[str, Path]) -> None:
    cfg = finetune_defaults()
    cfg.train.out_dir = str(sft_run["root"] / "run")
    ft = FinetuneConfig("sft", str(sft_run["root"] / "train.jsonl"), prompt_field="question", response_field="answer")
    with pytest.raises(ConfigError, match="already holds a run; choose another --train.out_dir$"):
        SFTTuner(cfg, ft, sft_run["root"] / "base")


def test_lora_sft_trains_adapters_and_the_new_token_rows(sft_run: dict[str, Path], tmp_path: Path, capsys) -> None:
    base = sft_run["root"] / "base"
    cfg = finetune_defaults()
    cfg.train.out_dir, cfg.train.max_steps, cfg.train.epochs = str(tmp_path / "run"), 30, 0
    cfg.train.batch_size, cfg.train.lr = 8, 3e-3
    train = str(sft_run["root"] / "train.jsonl")
    ft = FinetuneConfig("sft", train, prompt_field="question", response_field="answer", lora=LoraConfig(r=4))
    tuner = SFTTuner(cfg, ft, base)
    trainable = {n for n, p in tuner.model.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in tuner.model.named_parameters() if ".lora_" in n} | {
        "tok_emb.rows",
        "lm_head.rows",
    }
    before = frozen_state(tuner.model)
    rows_before = tuner.model.tok_emb.rows.detach().clone()
    tuner.run()
    after = frozen_state(tuner.model)
    assert all(torch.equal(before[k], after[k]) for k in before)  # the base weights never moved
    assert not torch.equal(rows_before, tuner.model.tok_emb.rows)  # the chat markers' embeddings learned
    adapter = tmp_path / "run" / "ckpt-latest"
    tensors = safetensors.torch.load_file(str(adapter / "adapter.safetensors"))
    assert tensors["tok_emb.rows"].shape == (4, 64)  # the four chat markers' embeddings (lm_head is untied: rows)
    adapted = load_checkpoint(adapter)
    # merged (adapters and rows folded in) the model computes the adapted logits
    x = torch.tensor([encode_chat(adapted.tokenizer, CHAT)[0]])
    expected = adapted.model(x)[0]
    assert cli.main(["lora", "merge", str(base), str(adapter), str(tmp_path / "merged")]) == 0
    merged = load_checkpoint(tmp_path / "merged")
    torch.testing.assert_close(merged.model(x)[0], expected, rtol=0, atol=1e-5)
    capsys.readouterr()
    assert cli.main(["chat", str(adapter), "--prompt", "Hi", "--temperature", "0", "--max-new-tokens", "5"]) == 0
    # the adapter's folder stands for the merged model where a full checkpoint is needed: compressed, fine-tuned
    assert cli.main(["compress", "quantize", str(adapter), str(tmp_path / "int8"), "--scheme", "int8"]) == 0
    assert load_checkpoint(tmp_path / "int8").meta["compression"][0]["method"] == "quantize"
    pruned = ["compress", "prune", str(adapter), str(tmp_path / "pruned"), "--sparsity", "0.3", "--recover-steps", "2"]
    assert cli.main(pruned) == 0  # recovery trains the merged model's weights
    cfg.train.out_dir = str(tmp_path / "again")
    again = SFTTuner(cfg, dataclasses.replace(ft, lora=None), adapter)
    assert all(p.requires_grad for p in again.model.parameters())
    assert math.isfinite(again.train_step()["train_loss"])


def test_exported_chat_model_has_the_template(sft_run: dict[str, Path], tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    assert cli.main(["export", str(sft_run["ckpt"]), str(tmp_path / "hf")]) == 0
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    ours = load_checkpoint(sft_run["ckpt"]).tokenizer
    ids = tokenizer.apply_chat_template(CHAT, tokenize=True, add_generation_prompt=True, return_dict=False)
    assert list(ids) == encode_chat(ours, CHAT, add_generation_prompt=True)[0]
    config = json.loads((tmp_path / "hf" / "generation_config.json").read_text())
    assert config["eos_token_id"] == ours.hf.token_to_id(END)  # replies end where llmmo chat's do


def test_chat_in_a_terminal(sft_run: dict[str, Path]) -> None:
    pexpect = pytest.importorskip("pexpect")
    import sys

    child = pexpect.spawn(
        sys.executable, ["-m", "llmmo", "chat", str(sft_run["ckpt"]), "--temperature", "0", "--max-new-tokens", "30"],
        encoding="utf-8", timeout=120,
    )  # fmt: skip
    child.expect("you> ")
    child.sendline("Sam has 5 pens and buys 2 more. How many pens?")
    child.expect("assistant> ")
    child.expect(r"tokens/s\]")
    child.expect("you> ")
    child.sendline("And then?")
    child.expect("assistant> ")
    child.expect("you> ")
    child.sendline("/reset")
    child.expect("conversation reset")
    child.expect("you> ")
    child.sendline("/exit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


# ---------------------------------------------------------------------------------------------------- qa


def test_qa_runs_end_to_end_on_xquad(data_dir: Path, tmp_path: Path, capsys) -> None:
    tree = json.loads((data_dir / "xquad" / "xquad.en.json").read_text(encoding="utf-8"))
    tree["data"] = tree["data"][:4]  # 4 articles
    small = tmp_path / "xquad-small.json"
    small.write_text(json.dumps(tree), encoding="utf-8")
    contexts = [p["context"] for a in tree["data"] for p in a["paragraphs"]]
    questions = [q["question"] for a in tree["data"] for p in a["paragraphs"] for q in p["qas"]]
    base = save_base(tmp_path / "base", train_tokenizer("bpe", contexts + questions, 800), block=256)
    code = cli.main(["finetune", "qa", str(base), "--train-file", str(small), "--train.out_dir", str(tmp_path / "run"),
                     "--train.epochs", "2", "--train.batch_size", "8", "--eval-fraction", "0.2"])  # fmt: skip
    assert code == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert 0 <= summary["val_exact_match"] <= summary["val_f1"] <= 100
    code = cli.main(["eval", str(tmp_path / "run" / "ckpt-latest"), "--task", "squad", "--file", str(small),
                     "--limit", "20"])  # fmt: skip
    assert code == 0
    scores = json.loads(capsys.readouterr().out)
    assert scores["questions"] == 20 and 0 <= scores["exact_match"] <= scores["f1"] <= 100


def test_corrupt_adapter_folder_is_named(tmp_path: Path) -> None:
    (tmp_path / "adapter_config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="adapter"):
        load_checkpoint(tmp_path)


# ----------------------------------------------------------------------------------------------- Chinese


def test_char_model_on_chinese_poetry_writes_chinese(data_dir: Path, tmp_path: Path, capsys) -> None:
    """The poems are JSON arrays whose "paragraphs" field holds a poem's lines; the corpus reads them as such."""
    out = tmp_path / "poetry"
    code = cli.main(
        ["train", "--data.path", str(data_dir / "chinese-poetry" / "*.json"), "--data.text_field", "paragraphs",
         "--data.block_size", "64", "--model.n_layer", "2", "--model.n_head", "2", "--model.n_embd", "96",
         "--train.max_steps", "150", "--train.eval_every", "150", "--train.eval_batches", "10", "--train.lr", "3e-3",
         "--train.warmup_steps", "20", "--train.out_dir", str(out)]
    )  # fmt: skip
    assert code == 0
    ckpt = load_checkpoint(out / "ckpt-best")
    vocab = ckpt.tokenizer.vocab_size
    assert vocab > 3000  # one id per character of the poems
    val = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if "val_loss" in x][-1]
    assert val["val_loss"] < np.log(vocab) - 2.0  # far better than a uniform guess over the characters
    capsys.readouterr()
    assert cli.main(["generate", str(out / "ckpt-best"), "--prompt", "春", "--max-new-tokens", "120", "--seed", "1",
                     "--top-k", "20"]) == 0  # fmt: skip
    text = capsys.readouterr().out.strip()
    han = sum("\u4e00" <= c <= "\u9fff" for c in text)
    assert han >= 0.6 * len(text) and ("，" in text or "。" in text), text  # Chinese characters and punctuation


def test_a_diverging_fine_tune_says_to_start_again(sft_run: dict[str, Path], tmp_path: Path) -> None:
    cfg = finetune_defaults()
    cfg.train.out_dir, cfg.train.max_steps, cfg.train.epochs = str(tmp_path / "run"), 5, 0
    cfg.train.lr, cfg.train.min_lr = 1e30, 1e29
    ft = FinetuneConfig("sft", str(sft_run["root"] / "train.jsonl"), prompt_field="question", response_field="answer")
    with pytest.raises(DivergedError, match="training diverged at step .* then start again$") as e:
        SFTTuner(cfg, ft, sft_run["root"] / "base").run()
    assert "--train.resume" not in str(e.value)  # a fine-tune does not resume
