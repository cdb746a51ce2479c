"""`llmmo <command>`: parses arguments, calls the library, prints. Nothing else lives here.

Errors the user can fix (LlmmoError) print one line and exit 2; anything else is an internal error (exit 1),
with a traceback only under --debug. Heavy imports (torch) happen inside the commands so --help is instant.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import sys
import typing
from pathlib import Path
from typing import Any

from llmmo.config import CHOICES, FAMILY_DEFAULTS, Config, all_keys, key_help, load_config, unknown_key
from llmmo.errors import ConfigError, LlmmoError

SECTION_HELP = {"model": "model shape", "data": "data and tokenizer", "train": "training loop"}


def _add_config_options(parser: argparse.ArgumentParser, sections: tuple[str, ...]) -> None:
    """--config FILE plus one --section.key option per config field, each showing its default."""
    parser.add_argument("--config", metavar="FILE", help="a YAML recipe (see configs/); options below override it")
    groups = {s: parser.add_argument_group(f"{s} options ({SECTION_HELP[s]})") for s in sections}
    meaning = key_help()
    for key, (typ, default) in all_keys().items():
        section = key.split(".")[0]
        if section in groups:
            base = next((t for t in typing.get_args(typ) if t is not type(None)), typ)  # int | None -> int
            metavar = "|".join(CHOICES[key]) if key in CHOICES else base.__name__.upper()
            if default is None and key.split(".")[1] in FAMILY_DEFAULTS["gpt2"]:
                default = "set by model.family"
            text = f"{meaning[key]} " if key in meaning else ""
            groups[section].add_argument(
                f"--{key}", dest=key, metavar=metavar, default=argparse.SUPPRESS, help=f"{text}(default: {default})"
            )


def _config_from_args(args: argparse.Namespace, sections: tuple[str, ...], base: Config | None = None) -> Config:
    """--config and the dotted options (over `base`); a resumed run starts from its own saved config.yaml."""
    overrides = {k: v for k, v in vars(args).items() if k.split(".")[0] in sections and "." in k}
    cfg = load_config(args.config, overrides, start=base)
    saved = Path(cfg.train.out_dir) / "config.yaml"
    if "train" in sections and cfg.train.resume and saved.is_file():
        cfg = load_config(args.config, overrides, base=saved)
    return cfg


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (exit 2) like every other error of ours."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _reject_unknown(unknown: list[str], command: str) -> None:
    """argparse's message for unknown options does not suggest; ours does (did you mean)."""
    import difflib

    flags = [u for u in unknown if u.startswith("--")]
    if not flags:
        raise ConfigError(f"unexpected arguments: {' '.join(unknown)}")
    name = flags[0][2:].split("=")[0]
    if "." in name and name not in all_keys():
        raise unknown_key(name)  # config.py words the did-you-mean for config keys
    if name in all_keys() or name == "config":  # a real option of other commands
        raise ConfigError(f"llmmo {command} does not take --{name} (see llmmo {command} --help)")
    close = difflib.get_close_matches(name, [k for k in all_keys()] + ["config", "debug"], n=1)
    hint = f"; did you mean --{close[0]}?" if close else "; see --help"
    raise ConfigError(f"unknown option {flags[0]}{hint}")


# ---------------------------------------------------------------------------------------------- train


class ProgressReporter:
    """A tqdm bar with loss, lr and tokens/s (its ETA is the run's); epoch runs print PyTorch-example lines."""

    def __init__(self) -> None:
        self.bar = None

    def __enter__(self) -> ProgressReporter:
        return self

    def __exit__(self, *exc: object) -> None:
        """The bar ends its line however the run ends, so that an error prints on a line of its own."""
        if self.bar is not None:
            self.bar.close()

    def start(self, info: dict[str, Any]) -> None:
        from tqdm import tqdm

        print(
            f"training {info['params']:,} parameters on {info['device']}: {info['data']} -> {info['out_dir']}",
            file=sys.stderr,
        )
        self.bar = tqdm(
            total=info["total_steps"],
            initial=info["start_step"],
            unit="step",
            dynamic_ncols=True,
            mininterval=0.1 if sys.stderr.isatty() else 30.0,  # a log file gets a line every 30 s, not 10 a second
        )

    def train_step(self, r: dict[str, Any]) -> None:
        postfix = {"loss": f"{r['train_loss']:.4f}", "lr": f"{r['lr']:.2e}", "tok_s": f"{r['tok_per_s']:,.0f}"}
        self.bar.set_postfix(postfix, refresh=False)  # shown at the bar's own pace (update below)
        self.bar.update(r["step"] - self.bar.n)
        if "epoch" in r:
            pct = 100.0 * r["epoch_samples"] / r["epoch_total"]
            self.bar.write(
                f"Train Epoch: {r['epoch']} [{r['epoch_samples']}/{r['epoch_total']} ({pct:.0f}%)]  "
                f"Loss: {r['train_loss']:.6f}"
            )

    def evaluation(self, r: dict[str, Any]) -> None:
        where = f"Validation Epoch: {r['epoch']}" if "epoch" in r else f"step {r['step']}"
        others = [
            f"{k[4:]} {v:.4f}"
            for k, v in r.items()
            if k.startswith("val_") and k != "val_loss" and isinstance(v, float)
        ]
        shown = "  ".join([f"val loss {r['val_loss']:.4f}", *others])
        self.bar.write(f"{where}  {shown}  (best {r['best_val_loss']:.4f})")


def _train_args_without_nproc(args: argparse.Namespace) -> list[str]:
    """What each process gets after `llmmo train`: the options given, but --nproc N / --nproc=N."""
    argv = args.argv[args.argv.index("train") + 1 :]
    out, skip = ["--debug"] if args.debug else [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc=") and a != "--debug":
            out.append(a)
    return out


def cmd_train(args: argparse.Namespace) -> int:
    if args.nproc > 1:
        from llmmo.distributed import launch_local

        cfg = _config_from_args(args, ("model", "data", "train"))  # a bad option fails here, not N times
        code = launch_local(args.nproc, _train_args_without_nproc(args))
        if code == 130:
            print("interrupted (Ctrl-C); checkpoint saved, resume with --train.resume true", file=sys.stderr)
            return 130
        if code != 0:
            latest = Path(cfg.train.out_dir) / "ckpt-latest"
            saved = (
                f"the last complete checkpoint is {latest}: continue with --train.resume true"
                if latest.is_dir()
                else "no checkpoint was written"
            )
            raise LlmmoError(f"a training process stopped (torchrun exit code {code}; its report is above); {saved}")
        return 0
    import torch.distributed

    from llmmo.distributed import close_world
    from llmmo.train import Trainer

    cfg = _config_from_args(args, ("model", "data", "train"))
    try:
        with ProgressReporter() as reporter:
            result = Trainer(cfg, reporter).run()
    except (torch.distributed.DistError, RuntimeError) as e:
        close_world(finished=False)
        # gloo reports a vanished peer as a plain RuntimeError
        if not isinstance(e, torch.distributed.DistError) and "by peer" not in str(e):
            raise
        raise LlmmoError(
            f"lost contact with the other training processes ({type(e).__name__}: {str(e).splitlines()[0]}); "
            "one of them failed or hung, see its messages"
        ) from None
    except BaseException:
        close_world(finished=False)
        raise
    close_world()
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun, rank 0 reports
        return 130 if result.interrupted else 0
    state = "interrupted (Ctrl-C); checkpoint saved, resume with --train.resume true" if result.interrupted else "done"
    print(
        f"{state}: step {result.step}, {result.tokens:,} tokens, {result.flops:.3e} FLOPs, "
        f"best val loss {result.best_val_loss:.4f} -> {result.out_dir}/ckpt-best"
    )
    return 130 if result.interrupted else 0


# ----------------------------------------------------------------------------------------- eval, info


def cmd_eval(args: argparse.Namespace) -> int:
    from llmmo.checkpoint import load_checkpoint
    from llmmo.data import prepare_data, tokenize_file
    from llmmo.evaluate import evaluate
    from llmmo.train import pick_device

    device = pick_device(args.device)
    ckpt = load_checkpoint(args.checkpoint, device=device)
    if args.task:
        return _eval_task(args, ckpt)
    if args.file:
        split, name = tokenize_file(args.file, ckpt.tokenizer, encoding=args.encoding or ckpt.data.encoding), args.file
    elif ckpt.data.source.startswith("hf:") and not ckpt.data.path:
        raise ConfigError(f"'{args.checkpoint}' was imported and names no data source; evaluate it with --file FILE")
    else:
        data = prepare_data(ckpt.data, tokenizer=ckpt.tokenizer, splits=(args.split,))
        split, name = data.splits[args.split], f"{data.source} [{args.split}]"
    result = evaluate(
        ckpt.model,
        split,
        ckpt.tokenizer.token_bytes(),
        batch_size=args.batch_size,
        max_batches=args.max_batches,
        device=device,
        block_size=ckpt.data.block_size,  # the windows it trained and was validated on
    )
    print(json.dumps({"checkpoint": str(args.checkpoint), "data": name} | result.as_dict(), indent=2))
    return 0


def _eval_task(args: argparse.Namespace, ckpt: Any) -> int:
    from llmmo.cli_tasks import report_skipped
    from llmmo.finetune.tasks import TaskFile, run_task, write_examples

    if not args.file:
        raise ConfigError(f"--task {args.task} scores a task file: pass it with --file FILE")
    fields = (args.prompt_field or "", args.reference_field or "")
    file = TaskFile(Path(args.file), *fields, args.limit, args.encoding or "utf-8", args.skip_bad_rows)
    result = run_task(ckpt, args.task, file, sampling_from_args(args), args.batch_size)
    report_skipped(result.skipped)
    if args.examples:
        write_examples(result, args.examples)
    print(json.dumps({"checkpoint": str(args.checkpoint), "task": args.task, "file": args.file} | result.scores))
    return 0


def _params(model: Any) -> int:
    """Parameters as the model computes with them (a quantized layer's in x out weights too)."""
    from llmmo.compress.report import count_params

    return count_params(model)[0]


def cmd_info(args: argparse.Namespace) -> int:
    from llmmo.checkpoint import load_checkpoint

    ckpt = load_checkpoint(args.checkpoint)
    model, path = ckpt.model, Path(args.checkpoint)
    info = {
        "checkpoint": str(path),
        "llmmo_version": ckpt.meta.get("llmmo_version"),
        "format_version": ckpt.meta.get("format_version"),
        "model": ckpt.meta["model"],
        "params": _params(model),
        "params_non_embedding": _params(model) - (model.num_params() - model.num_params(non_embedding=True)),
        "compression": ckpt.meta.get("compression", []),
        "train_flops_per_token": model.flops_per_token(ckpt.data.block_size),
        "tokenizer": {"kind": ckpt.tokenizer.kind, "vocab_size": ckpt.tokenizer.vocab_size},
        "data": {"source": ckpt.data.path or ckpt.data.source, "block_size": ckpt.data.block_size},
        "trained": {"step": ckpt.meta.get("step"), "tokens": ckpt.meta.get("tokens")},
        "bytes_on_disk": sum(f.stat().st_size for f in path.iterdir() if f.is_file()),
    }
    print(json.dumps(info, indent=2))
    return 0


# ------------------------------------------------------------------------------------------- generate


SAMPLING = ("max_new_tokens", "temperature", "top_k", "top_p", "repetition_penalty", "seed")


def sampling_from_args(args: argparse.Namespace, **more: Any) -> Any:
    """The GenerationConfig of the sampling options a command has (generate, chat, eval --task); the ones it
    lacks keep their defaults."""
    from llmmo.generate import GenerationConfig

    return GenerationConfig(**{k: getattr(args, k) for k in SAMPLING if hasattr(args, k)}, **more)


def unescape(text: str) -> str:
    r"""Backslash escapes typed on a command line (\n, \t, \\) become the characters; other text is kept."""
    try:
        return text.encode("latin-1", "backslashreplace").decode("unicode_escape")
    except UnicodeDecodeError as e:
        raise ConfigError(f"bad backslash escape in {text!r} ({e.reason}); write a backslash itself as \\\\") from None


def cmd_generate(args: argparse.Namespace) -> int:
    from llmmo.checkpoint import load_checkpoint
    from llmmo.generate import compile_decoder, decoding_dtype, generate, stream
    from llmmo.train import pick_device

    prompts = [unescape(p) for p in args.prompt or [""]]
    if args.stream and len(prompts) > 1:
        raise ConfigError("--stream shows one reply as it is written; give one --prompt, or drop --stream")
    if args.compile and args.pack:
        raise ConfigError("--pack's oneDNN layers cannot be compiled; choose --compile or --pack")
    if args.pack and args.dtype != "fp32":
        raise ConfigError("--pack packs fp32 weights; with --dtype bf16 use --compile")
    ckpt = load_checkpoint(args.checkpoint, device=pick_device(args.device))
    gen = sampling_from_args(args, stop=tuple(unescape(s) for s in args.stop), use_cache=not args.no_cache)
    model = decoding_dtype(ckpt.model, args.dtype)
    if args.pack:
        from llmmo.onednn import pack_linears

        model = pack_linears(model, rows=len(prompts))
    model = compile_decoder(model, rows=len(prompts)) if args.compile else model
    if args.stream:
        sys.stdout.write(prompts[0])
        for pieces in stream(model, ckpt.tokenizer, prompts, gen):
            sys.stdout.write(pieces[0])
            sys.stdout.flush()
        sys.stdout.write("\n")
        return 0
    for i, (prompt, text) in enumerate(zip(prompts, generate(model, ckpt.tokenizer, prompts, gen), strict=True)):
        if len(prompts) > 1:
            print(f"--- sample {i + 1} ---")
        print(prompt + text)
    return 0


# ------------------------------------------------------------------------------------------- compress


def _refuse_existing(out: str) -> None:
    if Path(out).exists():
        raise ConfigError(f"'{out}' already exists; choose another output folder or remove it")


def cmd_compress(args: argparse.Namespace) -> int:
    from llmmo.checkpoint import load_checkpoint
    from llmmo.compress import recover, save_compressed
    from llmmo.finetune.lora import merge_lora

    _refuse_existing(args.out)
    if getattr(args, "recover_lr", 1.0) <= 0:
        raise ConfigError(f"--recover-lr must be positive, got {args.recover_lr}")
    ckpt = load_checkpoint(args.checkpoint)
    # a LoRA fine-tune's folder: the model its adapters stand for, every weight trainable for --recover-steps
    merge_lora(ckpt.model).requires_grad_(True)
    if any(r["method"] == "quantize" for r in ckpt.meta.get("compression", [])):
        raise ConfigError(
            f"'{args.checkpoint}' is quantized already; quantize last: prune, factorize or distill the float "
            "checkpoint, then quantize the result"
        )
    if args.action == "quantize":
        from llmmo.compress.quantize import quantize

        record = quantize(ckpt.model, args.scheme, group_size=args.group_size)
    elif args.action == "prune":
        from llmmo.compress.prune import bake, magnitude_prune

        record = magnitude_prune(ckpt.model, args.sparsity, args.scope)
    elif args.action == "prune-structured":
        import dataclasses

        from llmmo.compress.structured import prune_structured, removal_for, training_batches

        if (args.params is None) == (args.heads + args.neurons == 0):
            raise ConfigError("prune-structured needs --params F, or --heads N and/or --neurons N (not both ways)")
        heads, neurons = (args.heads, args.neurons) if args.params is None else removal_for(ckpt.model.cfg, args.params)
        small, record = prune_structured(ckpt.model, heads, neurons, training_batches(ckpt))
        ckpt = dataclasses.replace(ckpt, model=small)
    else:
        from llmmo.compress.lowrank import lowrank

        record = lowrank(ckpt.model, rank_ratio=args.rank_ratio, energy=args.energy)
    if getattr(args, "recover_steps", 0) > 0:
        record["recovery"] = {"steps": args.recover_steps, "lr": args.recover_lr}
        record["recovery"]["val_loss"] = recover(ckpt, args.recover_steps, args.recover_lr)
    if args.action == "prune":
        record["zeros"] = bake(ckpt.model)
    save_compressed(ckpt, args.out, record)
    print(json.dumps({"out": args.out, "params": _params(ckpt.model)} | record, indent=2))
    return 0


def cmd_compress_report(args: argparse.Namespace) -> int:
    from llmmo.compress.report import ReportConfig, report, table

    cfg = ReportConfig(split=args.split, max_batches=args.max_batches, new_tokens=args.new_tokens)
    rows = report(args.checkpoints, args.out, cfg)
    print(table(rows))
    print(f"\n-> {args.out}/report.json, report.md, frontier.png")
    return 0


def cmd_distill(args: argparse.Namespace) -> int:
    import dataclasses

    from llmmo.checkpoint import load_checkpoint
    from llmmo.compress.distill import DistillTrainer
    from llmmo.config import config_from_dict

    teacher = load_checkpoint(args.teacher)
    # the student starts as the teacher's shape and data; --model.* options change the shape, and what follows
    # from the shape (MLP width, head width, key/value heads unless grouped) is derived again
    t = teacher.model.cfg
    n_kv_head = None if t.n_kv_head == t.n_head else t.n_kv_head
    student = dataclasses.replace(t, mlp_hidden=0, head_dim=0, depth=0, n_kv_head=n_kv_head)
    base = config_from_dict({"model": dataclasses.asdict(student), "data": dataclasses.asdict(teacher.data)})
    cfg = _config_from_args(args, ("model", "train"), base=base)
    with ProgressReporter() as reporter:
        result = DistillTrainer(cfg, teacher, args.alpha, args.temperature, reporter).run()
    print(f"distilled {result.step} steps: best val loss {result.best_val_loss:.4f} -> {result.out_dir}/ckpt-best")
    return 0


# ---------------------------------------------------------------------------------------------- scale


def _floats(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"expected comma-separated numbers like 1e12,3e12, got {text!r}") from None


def cmd_scale(args: argparse.Namespace) -> int:
    from llmmo.scaling.analysis import analyse, plan, plot
    from llmmo.scaling.sweep import SweepConfig, finished_runs, parse_sizes, plan_runs, read_ledger, sweep

    if args.action == "sweep":
        from tqdm import tqdm

        cfg = _config_from_args(args, ("model", "data", "train"))
        config = SweepConfig(
            _floats(args.budgets),
            depths=parse_sizes(args.sizes),
            points=args.points,
            min_steps=args.min_steps,
            tokens_per_param=args.tokens_per_param,
        )
        runs = plan_runs(cfg, config)
        bar = tqdm(total=sum(r["budget"] for r in runs), unit="FLOP", unit_scale=True, dynamic_ncols=True)
        bar.set_postfix_str(f"0/{len(runs)} runs")

        def progress(row: dict, done: int, total: int) -> None:
            bar.update(row["flops"])
            last = f"{row['run']} diverged" if "diverged" in row else f"{row['run']} val {row['val_loss']:.4f}"
            bar.set_postfix_str(f"{done}/{total} runs, last {last}")

        try:
            rows = sweep(cfg, config, args.out, progress, runs)
        finally:
            bar.close()
        print(f"{len(rows)} runs -> {args.out}/ledger.jsonl, ledger.csv")
        _report_diverged(rows)
        return 0
    rows = read_ledger(args.ledger)
    _report_diverged(rows)
    rows = finished_runs(rows)
    folder = Path(args.ledger) if Path(args.ledger).is_dir() else Path(args.ledger).parent
    fit_budgets = _floats(args.fit_budgets) if getattr(args, "fit_budgets", None) else None
    analysis = analyse(rows, fit_budgets, bootstrap=args.bootstrap)
    if args.action == "fit":
        from llmmo.fileio import write_text_atomic

        write_text_atomic(folder / "fit.json", json.dumps(analysis, indent=2) + "\n")
        print(json.dumps({k: v for k, v in analysis.items() if k != "law_samples"}, indent=2))
    elif args.action == "plot":
        for file in plot(rows, analysis, args.out or folder / "plots"):
            print(file)
    else:
        print(json.dumps(plan(analysis, rows, flops=args.flops, target_loss=args.target_loss), indent=2))
    return 0


def _report_diverged(rows: list[dict]) -> None:
    """Runs of the ledger that diverged: named on stderr (fits, plots and plans leave them out)."""
    diverged = [r for r in rows if "diverged" in r]
    for r in diverged:
        print(f"{r['run']}: {r['diverged']}", file=sys.stderr)
    if diverged:
        print(
            f"{len(diverged)} of {len(rows)} runs diverged and are left out; to run them, lower --train.lr and sweep "
            "into a new --out",
            file=sys.stderr,
        )


# ----------------------------------------------------------------------------------------------- lora


def cmd_lora_merge(args: argparse.Namespace) -> int:
    from llmmo.checkpoint import save_checkpoint
    from llmmo.finetune.lora import load_adapted, merge_lora

    _refuse_existing(args.out)
    ckpt = load_adapted(args.adapter, base=args.base)
    merge_lora(ckpt.model)
    compression = ckpt.meta.get("compression")
    save_checkpoint(
        args.out, ckpt.model, ckpt.tokenizer, ckpt.data, compression=compression, task=ckpt.task, head=ckpt.head
    )
    print(f"merged {args.adapter} into {args.base} -> {args.out}")
    return 0


# ------------------------------------------------------------------------------------ tokenizer, data


def cmd_tokenizer_train(args: argparse.Namespace) -> int:
    from llmmo.config import resolve_config
    from llmmo.data import fit_tokenizer

    out = Path(args.out)
    if out.is_dir():
        raise ConfigError(f"--out '{out}' is a folder; give the file to write (e.g. {out / 'tokenizer.json'})")
    if out.exists() and not args.overwrite:
        raise ConfigError(f"--out '{out}' exists; choose another path, or pass --overwrite to replace it")
    cfg = resolve_config(_config_from_args(args, ("data",)))
    tokenizer = fit_tokenizer(cfg.data)
    tokenizer.save(out)
    print(f"{tokenizer!r} trained on {cfg.data.path or cfg.data.source} [{cfg.data.train_split}] -> {args.out}")
    return 0


def cmd_data_prepare(args: argparse.Namespace) -> int:
    from llmmo.config import resolve_config
    from llmmo.data import prepare_data

    cfg = resolve_config(_config_from_args(args, ("data",)))
    data = prepare_data(cfg.data)
    print(f"{data.source}: {data.tokenizer!r}")
    for name, split in data.splits.items():
        print(f"  {name}: {len(split):,} tokens, {split.n_bytes:,} bytes -> {split.path}")
    return 0


# ------------------------------------------------------------------------------------------ export, import


def cmd_export(args: argparse.Namespace) -> int:
    from llmmo.interop import export_hf

    files = export_hf(args.checkpoint, args.out, max_shard_size=args.max_shard_size, overwrite=args.overwrite)
    print(f"exported {args.checkpoint} for transformers -> {args.out} ({', '.join(files)})")
    print(f"load it with AutoModelForCausalLM.from_pretrained({str(args.out)!r}) and AutoTokenizer.from_pretrained")
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    from llmmo.interop import download_from_hub, import_hf
    from llmmo.interop.hf_export import check_out_folder

    if args.hf_folder is None and args.from_hub is None:
        raise ConfigError(
            "give the folder to import and where to write: llmmo import HF_FOLDER OUT (or --from-hub NAME OUT)"
        )
    if args.hf_folder is not None and args.from_hub is not None:
        raise ConfigError("give either a local HF_FOLDER or --from-hub NAME, not both")
    if args.revision and args.from_hub is None:
        raise ConfigError("--revision picks a version on the Hub; it goes with --from-hub NAME")
    check_out_folder(Path(args.out), args.overwrite)  # before a download that may be large
    if args.from_hub is not None:
        folder, origin = download_from_hub(args.from_hub, args.revision), f"hf:{args.from_hub}"
    else:
        folder, origin = Path(args.hf_folder), f"hf:{args.hf_folder}"
    ckpt = import_hf(folder, args.out, overwrite=args.overwrite, origin=origin)
    cfg = ckpt.model.cfg
    tok = ckpt.tokenizer
    print(
        f"imported {origin[3:]}: {cfg.family} family, {ckpt.model.num_params():,} parameters, {cfg.n_layer} layers, "
        f"context {cfg.block_size}, {tok.kind} tokenizer of {tok.vocab_size:,} tokens -> {args.out}"
    )
    return 0


# ------------------------------------------------------------------------------------------------ main


def at_least(low: int) -> typing.Callable[[str], int]:
    def parse(text: str) -> int:
        value = int(text)
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value

    parse.__name__ = "int"  # argparse names the type in its message
    return parse


def build_parser() -> argparse.ArgumentParser:
    debug = "show the traceback of internal errors"
    parser = Parser(prog="llmmo", description="Train, evaluate and sample Transformer LMs.", allow_abbrev=False)
    parser.add_argument("--debug", action="store_true", help=debug)
    # each command takes it too, defaulting to SUPPRESS so that it leaves `llmmo --debug CMD`'s value alone
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=debug)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "train",
        parents=[common],
        allow_abbrev=False,
        help="train a model",
        description="Train a model. Keys: --config recipe, then --section.key overrides.",
    )
    p.add_argument(
        "--nproc",
        type=at_least(1),
        default=1,
        help="train in N processes on this machine (launches torchrun; one per GPU, or CPU processes with gloo)",
    )
    _add_config_options(p, ("model", "data", "train"))
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", parents=[common], allow_abbrev=False, help="loss, perplexity, bits per byte")
    p.add_argument("checkpoint", help="a checkpoint folder (e.g. runs/NAME/ckpt-best)")
    p.add_argument("--split", default="val", help="a split of the checkpoint's data source (default: val)")
    p.add_argument("--file", help="evaluate on this text file instead of a split (with --task: the task file)")
    p.add_argument("--batch-size", type=at_least(1), default=16, help="(default: 16)")
    p.add_argument("--max-batches", type=at_least(0), default=0, help="0: the whole split (default: 0)")
    t = p.add_argument_group("task evaluation (generation and scoring of a task file)")
    t.add_argument(
        "--task",
        choices=["gsm8k", "squad", "chrf", "bleu", "exact", "classify"],
        help="gsm8k: '#### N' answers; squad: EM/F1; chrf, bleu: sacrebleu; exact: exact match; classify: accuracy",
    )
    t.add_argument("--limit", type=at_least(0), default=0, help="score the first N examples; 0: all (default: 0)")
    t.add_argument("--max-new-tokens", type=at_least(1), default=256, help="per reply (default: 256)")
    t.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (default: 0)")
    t.add_argument("--top-k", type=int, default=0, help="(default: 0, off)")
    t.add_argument("--repetition-penalty", type=float, default=1.0, help="(default: 1.0, off)")
    t.add_argument("--seed", type=int, default=0, help="for sampled replies (default: 0)")
    t.add_argument(
        "--prompt-field", help="field of the prompt (default: question for gsm8k, text for classify, else prompt)"
    )
    t.add_argument(
        "--reference-field",
        help="field of the reference (default: answer for gsm8k, label for classify, else response)",
    )
    t.add_argument("--examples", metavar="FILE", help="write each example, reply and score to this JSONL file")
    p.add_argument("--encoding", help="of --file (default: the checkpoint's data.encoding; a task file's: utf-8)")
    t.add_argument(
        "--skip-bad-rows", action="store_true", help="leave out rows that cannot be read, naming each (not squad)"
    )
    p.add_argument("--device", default="auto", help="(default: auto)")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("generate", parents=[common], allow_abbrev=False, help="sample text from a checkpoint")
    p.add_argument("checkpoint", help="a checkpoint folder")
    p.add_argument(
        "--prompt",
        action="append",
        help="a prompt (\\n and other escapes understood); repeat for a batch (default: empty)",
    )
    p.add_argument("--max-new-tokens", type=int, default=200, help="(default: 200)")
    p.add_argument("--temperature", type=float, default=1.0, help="0 is greedy (default: 1.0)")
    p.add_argument("--top-k", type=int, default=0, help="0 is off (default: 0)")
    p.add_argument("--top-p", type=float, default=1.0, help="1 is off (default: 1.0)")
    p.add_argument("--repetition-penalty", type=float, default=1.0, help="(default: 1.0)")
    p.add_argument("--seed", type=int, default=None, help="(default: random)")
    p.add_argument(
        "--stop", action="append", default=[], help="stop string (escapes understood, e.g. '\\n\\n'); repeatable"
    )
    p.add_argument("--stream", action="store_true", help="print tokens as they are sampled")
    p.add_argument("--no-cache", action="store_true", help="recompute the context each step (for checks)")
    p.add_argument(
        "--compile",
        action="store_true",
        help="compile the decoding step first (torch.compile; 10-60 s on a CPU, then up to 3x faster per token)",
    )
    p.add_argument(
        "--pack",
        action="store_true",
        help="pack the weights for oneDNN first (CPU, fp32; 1.2-1.4x faster per token with 8 prompts at 10.7M, "
        "~80%% of --compile there, without compiling)",
    )
    p.add_argument(
        "--dtype",
        choices=("fp32", "bf16"),
        default="fp32",
        help="the weights' type while decoding: bf16 reads half the bytes (CPUs with AVX512-BF16/AMX, GPUs): "
        "with --compile ~1.8x fp32's tokens/s at 10.7M parameters, slower for small models (default: fp32)",
    )
    p.add_argument("--device", default="auto", help="(default: auto)")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("compress", parents=[common], help="make a checkpoint smaller: quantize, prune, ...")
    csub = p.add_subparsers(dest="action", required=True, metavar="METHOD")
    q = csub.add_parser(
        "quantize", parents=[common], allow_abbrev=False, help="int8 / dynamic-int8 / int4 weights of the blocks"
    )
    q.add_argument("--scheme", choices=["int8", "dynamic-int8", "int4"], default="int8", help="(default: int8)")
    q.add_argument("--group-size", type=at_least(2), default=64, help="int4: inputs per scale (default: 64)")
    pr = csub.add_parser("prune", parents=[common], allow_abbrev=False, help="zero the smallest weights")
    pr.add_argument("--sparsity", type=float, default=0.5, help="fraction of the blocks' weights (default: 0.5)")
    pr.add_argument("--scope", choices=["global", "layer"], default="global", help="(default: global)")
    ps = csub.add_parser(
        "prune-structured",
        parents=[common],
        allow_abbrev=False,
        help="remove whole attention heads and MLP neurons (a smaller, faster model)",
    )
    ps.add_argument("--params", type=float, help="remove at least this fraction of the parameters (e.g. 0.25)")
    ps.add_argument("--heads", type=at_least(0), default=0, help="or: heads to remove per layer (default: 0)")
    ps.add_argument("--neurons", type=at_least(0), default=0, help="and MLP neurons per layer (default: 0)")
    lr = csub.add_parser("lowrank", parents=[common], allow_abbrev=False, help="factorize layers by truncated SVD")
    lr.add_argument("--rank-ratio", type=float, help="keep this fraction of each layer's full rank")
    lr.add_argument("--energy", type=float, help="or: keep the singular values holding this share of the energy")
    for c in (q, pr, ps, lr):
        c.add_argument("checkpoint", help="the checkpoint to compress")
        c.add_argument("out", help="the compressed checkpoint folder to write")
        c.set_defaults(func=cmd_compress)
    for c in (pr, ps, lr):
        c.add_argument("--recover-steps", type=at_least(0), default=0, help="fine-tune afterwards (default: 0)")
        c.add_argument("--recover-lr", type=float, default=3e-4, help="(default: 3e-4)")
    d = csub.add_parser(
        "distill",
        parents=[common],
        allow_abbrev=False,
        help="train a smaller student on a teacher's predictions",
        description="Train a student (the teacher's shape changed by --model.* options, on the teacher's data) on "
        "alpha * T^2 * KL(teacher || student at temperature T) + (1 - alpha) * cross-entropy.",
    )
    d.add_argument("teacher", help="the teacher checkpoint")
    d.add_argument("--alpha", type=float, default=0.5, help="weight of the teacher's term (default: 0.5)")
    d.add_argument("--temperature", type=float, default=2.0, help="softens both distributions (default: 2.0)")
    _add_config_options(d, ("model", "train"))
    d.set_defaults(func=cmd_distill)
    r = csub.add_parser(
        "report",
        parents=[common],
        allow_abbrev=False,
        help="bytes, parameters, quality, speed and memory of checkpoints, and the frontier plot",
    )
    r.add_argument("checkpoints", nargs="+", metavar="CKPT", help="checkpoints to compare (the original too)")
    r.add_argument("--split", default="val", help="evaluation split of their data (default: val)")
    r.add_argument("--max-batches", type=at_least(0), default=50, help="0: the whole split (default: 50)")
    r.add_argument("--new-tokens", type=at_least(1), default=64, help="generated per row, for tok/s (default: 64)")
    r.add_argument("--out", default="compress-report", help="folder for the files (default: compress-report)")
    r.set_defaults(func=cmd_compress_report)

    p = sub.add_parser("scale", parents=[common], help="scaling laws of your own models: sweep, fit, plot, plan")
    ssub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    s = ssub.add_parser(
        "sweep",
        parents=[common],
        allow_abbrev=False,
        help="train a grid of sizes x FLOP budgets into a ledger",
        description="Train one run per (budget, size): sizes by the depth dial (model.depth; model.aspect sets "
        "the width per layer), tokens = budget / FLOPs per token, lr scaled with width. Resumes: runs already in "
        "the ledger are skipped.",
    )
    s.add_argument("--budgets", required=True, help="training FLOPs per run, comma-separated (e.g. 1e12,3e12,1e13)")
    s.add_argument("--sizes", default="auto", help="auto, or depths like 1,2,3 (default: auto)")
    s.add_argument("--points", type=at_least(2), default=3, help="auto: sizes per budget (default: 3)")
    s.add_argument("--min-steps", type=at_least(1), default=20, help="leave out shorter runs (default: 20)")
    s.add_argument(
        "--tokens-per-param", type=float, default=20.0, help="auto: centre each budget's sizes here (default: 20)"
    )
    s.add_argument("--out", default="runs/sweep", help="the sweep folder (default: runs/sweep)")
    _add_config_options(s, ("model", "data", "train"))
    f = ssub.add_parser("fit", parents=[common], allow_abbrev=False, help="fit L(N, D) and IsoFLOP laws")
    pl = ssub.add_parser("plot", parents=[common], allow_abbrev=False, help="PNG and HTML figures of a ledger")
    pl.add_argument("--out", help="(default: LEDGER's folder/plots)")
    pn = ssub.add_parser("plan", parents=[common], allow_abbrev=False, help="best N and D for a budget or a loss")
    pn.add_argument("--flops", type=float, help="a training compute budget")
    pn.add_argument("--target-loss", type=float, help="or: the loss to reach with the least compute")
    for c in (f, pl, pn):
        c.add_argument("ledger", help="a sweep folder or its ledger.jsonl")
        c.add_argument("--fit-budgets", help="fit on these budgets only; the other runs are predicted (e.g. 1e12,3e12)")
        c.add_argument("--bootstrap", type=at_least(0), default=100, help="resamples for intervals (default: 100)")
        c.set_defaults(func=cmd_scale)
    s.set_defaults(func=cmd_scale)

    from llmmo import cli_tasks

    cli_tasks.add_parsers(sub, common)

    p = sub.add_parser("lora", parents=[common], help="LoRA adapters")
    lsub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    m = lsub.add_parser("merge", parents=[common], allow_abbrev=False, help="fold an adapter into its base")
    m.add_argument("base", help="the base checkpoint the adapter was trained on")
    m.add_argument("adapter", help="the adapter folder (adapter.safetensors, adapter_config.json)")
    m.add_argument("out", help="the merged checkpoint folder to write")
    m.set_defaults(func=cmd_lora_merge)

    p = sub.add_parser("tokenizer", parents=[common], help="tokenizer tools")
    tsub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    t = tsub.add_parser("train", parents=[common], allow_abbrev=False, help="train a tokenizer on a corpus")
    _add_config_options(t, ("data",))
    t.add_argument("--out", required=True, help="where to write tokenizer.json")
    t.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    t.set_defaults(func=cmd_tokenizer_train)

    p = sub.add_parser("data", parents=[common], help="data tools")
    dsub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    d = dsub.add_parser("prepare", parents=[common], allow_abbrev=False, help="tokenize a corpus into the cache")
    _add_config_options(d, ("data",))
    d.set_defaults(func=cmd_data_prepare)

    p = sub.add_parser(
        "export",
        parents=[common],
        allow_abbrev=False,
        help="write a checkpoint as a transformers model folder",
        description="Write a checkpoint for another library: --format hf is a transformers folder "
        "(GPT2LMHeadModel, LlamaForCausalLM, or Qwen3ForCausalLM for the llama family with QK-norm; safetensors, "
        "tokenizer) that loads with no llmmo code.",
    )
    p.add_argument("checkpoint", help="a checkpoint folder (e.g. runs/NAME/ckpt-best)")
    p.add_argument("out", help="the folder to write")
    p.add_argument("--format", choices=["hf"], default="hf", help="hf: Hugging Face transformers (default: hf)")
    p.add_argument(
        "--max-shard-size", default="5GB", help="larger weights are split into shards of this size (default: 5GB)"
    )
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists and is not empty")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser(
        "import",
        parents=[common],
        allow_abbrev=False,
        help="convert a transformers model folder into a checkpoint",
        description="Convert a transformers GPT2LMHeadModel, LlamaForCausalLM or Qwen3ForCausalLM (a local folder, "
        "or --from-hub NAME) into an llmmo checkpoint. Needs the hf extra: pip install 'llmmo[hf]'.",
    )
    p.add_argument("hf_folder", nargs="?", metavar="HF_FOLDER", help="a folder written by save_pretrained()")
    p.add_argument("out", metavar="OUT", help="the checkpoint folder to write")
    p.add_argument("--from-hub", metavar="NAME", help="download NAME (owner/model) from the Hugging Face Hub instead")
    p.add_argument("--revision", help="with --from-hub: a branch, tag or commit (default: main)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists and is not empty")
    p.set_defaults(func=cmd_import)

    p = sub.add_parser("info", parents=[common], help="describe a checkpoint")
    p.add_argument("checkpoint", help="a checkpoint folder")
    p.set_defaults(func=cmd_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    args.argv = list(argv if argv is not None else sys.argv[1:])
    try:
        if unknown:
            # the command as typed: `scale sweep` takes options that `scale fit` does not
            _reject_unknown(unknown, " ".join(filter(None, [args.command, getattr(args, "action", None)])))
        return args.func(args)
    except LlmmoError as e:
        print(f"llmmo: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("llmmo: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away (`llmmo generate ... | head`): stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except (FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError, PermissionError) as e:
        # a path that cannot be read or written: a missing folder, a file in a folder's place, permissions
        if args.debug:
            raise
        where = f": '{e.filename}'" if e.filename else ""
        fix = "give a path whose folder exists and that you can write (or read, for inputs)"
        print(f"llmmo: error: {e.strerror or e}{where}; {fix}", file=sys.stderr)
        return 2
    except Exception as e:
        if args.debug:
            raise
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            where = f" (writing '{e.filename}')" if e.filename else ""
            print(f"llmmo: error: no space left on the device{where}; free disk space and run again", file=sys.stderr)
            return 2
        print(f"llmmo: internal error: {type(e).__name__}: {e} (rerun with --debug for the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
