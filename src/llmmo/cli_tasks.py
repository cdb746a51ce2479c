"""The task commands of `llmmo`: finetune, classify, chat (see cli.py for the rest; the same rules hold)."""

from __future__ import annotations

import argparse
import json
import sys
import time

from llmmo.errors import ConfigError, DataError, LlmmoError


def _lora_config(args: argparse.Namespace):
    from llmmo.finetune.lora import LoraConfig

    given = {k: getattr(args, f"lora_{k}") for k in ("r", "alpha", "dropout", "targets")}
    if all(v is None for v in given.values()):
        return None
    cfg = LoraConfig()
    for key, value in given.items():
        if value is not None:
            setattr(cfg, key, [t.strip() for t in value.split(",") if t.strip()] if key == "targets" else value)
    return cfg


def cmd_finetune(args: argparse.Namespace) -> int:
    from llmmo.cli import ProgressReporter, _config_from_args
    from llmmo.finetune.tuner import FinetuneConfig, finetune, finetune_defaults

    cfg = _config_from_args(args, ("train",), base=finetune_defaults())
    ft = FinetuneConfig(
        task=args.task,
        train_file=args.train_file,
        eval_file=args.eval_file or "",
        eval_fraction=args.eval_fraction,
        text_field=args.text_field,
        label_field=args.label_field,
        prompt_field=args.prompt_field,
        response_field=args.response_field,
        encoding=args.encoding,
        skip_bad_rows=args.skip_bad_rows,
        pooling=args.pooling,
        max_len=args.max_len,
        lora=_lora_config(args),
    )
    with ProgressReporter() as reporter:
        result = finetune(cfg, ft, args.base, reporter)
    report_skipped(result["skipped"])
    for note in result["notes"]:
        print(f"note: {note}", file=sys.stderr)
    shown = {k: v for k, v in result["last_eval"].items() if k.startswith("val_")}
    print(json.dumps({"out": f"{result['out_dir']}/ckpt-best", "step": result["step"]} | shown))
    return 130 if result["interrupted"] else 0


def report_skipped(skipped: list[str]) -> None:
    """The first rows left out by --skip-bad-rows ("file:line: why"), and how many in all."""
    for line in skipped[:20]:
        print(f"skipped {line}", file=sys.stderr)
    if skipped:
        print(f"skipped {len(skipped)} bad rows in all", file=sys.stderr)


def cmd_classify(args: argparse.Namespace) -> int:
    from llmmo.finetune.predict import TextClassifier
    from llmmo.train import pick_device

    texts = args.text or [line for line in _stdin_text().split("\n") if line.strip()]
    if not texts:
        raise ConfigError("no text to classify; pass texts as arguments or one per line on stdin")
    classifier = TextClassifier.load(args.checkpoint, device=pick_device(args.device))
    for text, p in zip(texts, classifier.predict(texts), strict=True):
        if args.json:
            print(json.dumps({"text": text, "label": p.label, "probabilities": p.probabilities}, ensure_ascii=False))
        else:
            probs = "  ".join(f"{name} {value:.3f}" for name, value in p.probabilities.items())
            print(f"{p.label}\t{probs}\t{text}")
    return 0


def _stdin_text() -> str:
    """Standard input decoded as UTF-8 (Python's own decoding may let undecodable bytes through as surrogates)."""
    if not hasattr(sys.stdin, "buffer"):  # a text stream put in its place (no bytes to decode)
        return sys.stdin.read()
    raw = sys.stdin.buffer.read()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"standard input is not UTF-8 text (byte {e.start}); convert it, e.g. with iconv") from None


HELP_LINE = "/reset starts over, /system TEXT sets the system message, /exit (or Ctrl-D) quits"


def _reply(session, text: str, show_speed: bool) -> None:
    start, pieces = time.perf_counter(), 0
    for piece in session.send(text):
        sys.stdout.write(piece)
        sys.stdout.flush()
        pieces += 1
    sys.stdout.write("\n")
    if show_speed:
        seconds = time.perf_counter() - start
        print(f"[{pieces} tokens, {pieces / max(seconds, 1e-9):.1f} tokens/s]", file=sys.stderr)


def cmd_chat(args: argparse.Namespace) -> int:
    from llmmo.checkpoint import load_checkpoint
    from llmmo.cli import sampling_from_args
    from llmmo.finetune.chat import ChatSession
    from llmmo.train import pick_device

    ckpt = load_checkpoint(args.checkpoint, device=pick_device(args.device))
    session = ChatSession(ckpt.model, ckpt.tokenizer, sampling_from_args(args), system=args.system)
    if args.prompt:  # scripted: each prompt is the next user turn; replies only, one per line
        for prompt in args.prompt:
            _reply(session, prompt, show_speed=False)
        return 0
    try:
        import readline  # noqa: F401  (line editing and history for input())
    except ImportError:
        pass
    print(f"chatting with {args.checkpoint}; {HELP_LINE}", file=sys.stderr)
    while True:
        try:
            line = input("you> ")
        except EOFError:
            print(file=sys.stderr)
            return 0
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            return 0
        if text == "/reset":
            session.reset()
            print("(conversation reset)", file=sys.stderr)
            continue
        if text.startswith("/system"):
            session.system = text[len("/system") :].strip() or None
            session.reset()
            print(f"(system message {'set' if session.system else 'cleared'}; conversation reset)", file=sys.stderr)
            continue
        if text.startswith("/"):
            print(f"(unknown command {text.split()[0]}; {HELP_LINE})", file=sys.stderr)
            continue
        dropped = session.dropped
        sys.stdout.write("assistant> ")
        try:
            _reply(session, text, show_speed=True)
        except LlmmoError as e:  # e.g. a chat marker typed in the message: say so, and keep chatting
            print(f"\n(error: {e})", file=sys.stderr)
            continue
        if session.dropped > dropped:
            print(f"({session.dropped - dropped} earlier messages no longer fit the context)", file=sys.stderr)


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        from llmmo.serve.app import ServeConfig, create_app, listen, serve
    except ImportError as e:
        raise ConfigError(
            f"llmmo serve needs the serve extra ({e.name} is missing): pip install 'llmmo[serve]'"
        ) from None
    from pathlib import Path

    from llmmo.checkpoint import load_checkpoint
    from llmmo.train import pick_device

    sock = listen(args.host, args.port)  # a port in use fails here, before the checkpoint loads
    with sock:  # closed however this ends (a checkpoint that fails to load too)
        device = pick_device(args.device)
        ckpt = load_checkpoint(args.checkpoint, device="cpu" if args.engine == "process" else device)
        path = Path(args.checkpoint).resolve()
        name = args.model_name or (path.parent.name if path.name.startswith("ckpt-") else path.name)
        cfg = ServeConfig(
            name,
            args.api_key,
            args.max_batch,
            args.max_queue,
            args.request_timeout,
            threads=args.threads,
            engine_process=args.engine == "process",
            checkpoint_path=str(path),
            device=str(device),
        )
        app = create_app(ckpt, cfg)
        del ckpt  # with an engine process, this process keeps the tokenizer only
        port = sock.getsockname()[1]  # the one picked for --port 0
        print(f"serving {args.checkpoint} as '{name}' on http://{args.host}:{port}/ (chat page at /)", file=sys.stderr)
        serve(app, sock)
    return 0


def port_number(text: str) -> int:
    """--port: a TCP port; one out of range is a usage error (the socket calls raise OverflowError for it)."""
    value = int(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be 0-65535 (0: any free port), got {value}")
    return value


port_number.__name__ = "int"  # argparse names the type in its message for a non-number


def add_parsers(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    from llmmo.cli import _add_config_options, at_least

    p = sub.add_parser("finetune", parents=[common], help="adapt a checkpoint to a task: classify, sft, qa")
    fsub = p.add_subparsers(dest="task", required=True, metavar="TASK")
    about = {
        "classify": "a classifier on labelled text (TSV/CSV/JSONL)",
        "sft": "instruction tuning on conversations (JSONL: messages, or prompt/response)",
        "qa": "extractive question answering on SQuAD-format JSON",
    }
    for task, text in about.items():
        f = fsub.add_parser(task, parents=[common], allow_abbrev=False, help=text, description=f"Fine-tune {text}.")
        f.add_argument("base", help="the pretrained checkpoint to start from")
        f.add_argument("--train-file", required=True, help="the training examples")
        f.add_argument("--eval-file", help="the evaluation examples (default: hold out --eval-fraction)")
        f.add_argument("--eval-fraction", type=float, default=0.05, help="(default: 0.05)")
        f.add_argument("--encoding", default="utf-8", help="of the task files (default: utf-8)")
        f.add_argument("--skip-bad-rows", action="store_true", help="leave out and count bad rows instead of stopping")
        f.add_argument("--max-len", type=at_least(0), default=0, help="tokens per example; 0: block_size (default)")
        if task == "classify":
            f.add_argument("--text-field", default="text", help="column or field of the text (default: text)")
            f.add_argument("--label-field", default="label", help="column or field of the label (default: label)")
            f.add_argument("--pooling", choices=["last", "mean"], default="last", help="(default: last)")
        if task == "sft":
            f.add_argument("--prompt-field", default="prompt", help="for rows without messages (default: prompt)")
            f.add_argument("--response-field", default="response", help="(default: response)")
        f.set_defaults(
            func=cmd_finetune, text_field="text", label_field="label", pooling="last", prompt_field="prompt",
            response_field="response",
        )  # fmt: skip
        lora = f.add_argument_group("LoRA (any of these trains adapters instead of every weight)")
        lora.add_argument("--lora.r", dest="lora_r", type=at_least(1), help="the adapters' rank (default: 8)")
        lora.add_argument("--lora.alpha", dest="lora_alpha", type=float, help="scale alpha / r (default: 16)")
        lora.add_argument("--lora.dropout", dest="lora_dropout", type=float, help="(default: 0)")
        lora.add_argument(
            "--lora.targets",
            dest="lora_targets",
            help="comma-separated, of attn.qkv, attn.proj, mlp.up, mlp.gate, mlp.proj, lm_head "
            "(default: attn.qkv,attn.proj)",
        )
        _add_config_options(f, ("train",))

    p = sub.add_parser("classify", parents=[common], allow_abbrev=False, help="label text with a fine-tuned classifier")
    p.add_argument("checkpoint", help="a checkpoint from `llmmo finetune classify`")
    p.add_argument("text", nargs="*", help="texts to label (default: one per line from stdin)")
    p.add_argument("--json", action="store_true", help="one JSON object per text")
    p.add_argument("--device", default="auto", help="(default: auto)")
    p.set_defaults(func=cmd_classify)

    p = sub.add_parser("chat", parents=[common], allow_abbrev=False, help="chat with an instruction-tuned checkpoint")
    p.add_argument("checkpoint", help="a checkpoint from `llmmo finetune sft`")
    p.add_argument("--system", help="the system message")
    p.add_argument("--prompt", action="append", help="answer this (repeat for more turns) and exit: for scripts")
    p.add_argument("--max-new-tokens", type=at_least(1), default=256, help="per reply (default: 256)")
    p.add_argument("--temperature", type=float, default=0.7, help="0 is greedy (default: 0.7)")
    p.add_argument("--top-k", type=int, default=50, help="(default: 50)")
    p.add_argument("--top-p", type=float, default=1.0, help="(default: 1.0)")
    p.add_argument("--seed", type=int, default=None, help="(default: random)")
    p.add_argument("--device", default="auto", help="(default: auto)")
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser(
        "serve", parents=[common], allow_abbrev=False, help="an OpenAI-compatible HTTP server with a chat page",
        description="Serve a checkpoint: /v1/models, /v1/completions, /v1/chat/completions (stream: server-sent "
        "events), /health, /metrics, and a chat page at /. Needs: pip install 'llmmo[serve]'.",
    )  # fmt: skip
    p.add_argument("checkpoint", help="a checkpoint folder (chat needs one from `llmmo finetune sft`)")
    p.add_argument("--host", default="127.0.0.1", help="(default: 127.0.0.1)")
    p.add_argument("--port", type=port_number, default=8000, help="0-65535; 0: any free port (default: 8000)")
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' (default: none)")
    p.add_argument("--max-batch", type=at_least(1), default=8, help="requests decoded together (default: 8)")
    p.add_argument("--max-queue", type=at_least(1), default=64, help="waiting requests; more get 429 (default: 64)")
    p.add_argument(
        "--request-timeout", type=float, default=120.0, help="seconds of generation per request (default: 120)"
    )
    p.add_argument("--model-name", help="the name clients pass as model (default: the run folder's name)")
    p.add_argument("--device", default="auto", help="(default: auto)")
    p.add_argument(
        "--threads", type=at_least(0), default=0, help="CPU threads for decoding; 0: all cores but one (default: 0)"
    )
    p.add_argument(
        "--engine",
        choices=["process", "thread"],
        default="process",
        help="decode in a process of its own, or in a thread of the server's (default: process)",
    )
    p.set_defaults(func=cmd_serve)
