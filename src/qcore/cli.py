"""The ``qcore`` command. Errors print as one line and exit non-zero (``--debug`` for tracebacks)."""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

from qcore.plugin.errors import ConfigError, QcoreError
from qcore.progress import get_logger

DEFAULT_MODEL = "smollm2-135m"
DEFAULTS = {"n_samples": 64, "seq_len": 512, "seed": 0, "eval_seq_len": 512, "eval_tokens": 16384}
BROKEN_PIPE_EXIT = 141
"""Exit status when stdout is closed early (``qcore list | head -1``): 128 + SIGPIPE, as the shell
reports a command that SIGPIPE ended."""

log = get_logger("cli")


def main(argv: list[str] | None = None) -> int:
    """Run one command; returns the exit status (a closed stdout ends it quietly)."""
    try:
        try:
            code = _main(argv)
        finally:
            sys.stdout.flush()  # a closed pipe shows here, not as a traceback at interpreter exit
    except BrokenPipeError:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # whatever is still buffered goes nowhere
        return BROKEN_PIPE_EXIT
    return code


def _main(argv: list[str] | None) -> int:
    from qcore.cli_output import quiet_known_warnings
    from qcore.progress import progress_enabled

    quiet_known_warnings()
    if not progress_enabled() and "tqdm" not in sys.modules:  # libraries' own bars too (tqdm reads it on import)
        os.environ.setdefault("TQDM_DISABLE", "1")
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except BrokenPipeError:  # stdout closed early: main() ends quietly
        raise
    except (QcoreError, FileNotFoundError, ValueError) as exc:
        if args.debug:
            raise
        print(f"qcore: error: {flag_words(str(exc))}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as exc:
        print(f"qcore: interrupted; {exc or 'no output was written in place'}", file=sys.stderr)
        return 130
    except Exception as exc:  # an unexpected failure: still one line, the traceback with --debug
        if args.debug:
            raise
        print(f"qcore: error: {type(exc).__name__}: {exc} (run with --debug for the traceback)", file=sys.stderr)
        return 1


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="qcore", description="Quantize large language models; every method a plugin.")
    p.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    p.add_argument("-v", "--verbose", action="store_true", help="show info logs")
    sub = p.add_subparsers(title="commands", metavar="COMMAND")

    s = sub.add_parser("list", help="list installed methods")
    _json_arg(s)
    s.set_defaults(func=cmd_list)

    s = sub.add_parser("plugins", help="show loaded plugins, their versions and errors")
    _json_arg(s)
    s.set_defaults(func=cmd_plugins)

    s = sub.add_parser("compat", help="print the compatibility matrix (method x architecture x option)")
    s.add_argument("--markdown", action="store_true", help="print every table as Markdown "
                   "(docs/compatibility.md) instead of the terminal summary")
    _json_arg(s)
    s.set_defaults(func=cmd_compat)

    s = sub.add_parser("check", help="check whether a method can quantize a model with these options")
    s.add_argument("model", help=f"model name ({DEFAULT_MODEL}, stories260k) or local directory")
    _method_args(s)
    _source_args(s)
    _json_arg(s)
    s.set_defaults(func=cmd_check)

    s = sub.add_parser(
        "quantize", help="quantize a model and save a packed checkpoint",
        description="Quantize MODEL with one method or a chain, save it atomically to --out, and with "
                    f"--eval report float vs quantized perplexity, size and time. Defaults: "
                    f"{DEFAULTS['n_samples']} calibration windows of {DEFAULTS['seq_len']} tokens (seed 0) "
                    "from --calibration (default: the Python docs corpus pydoc_data.topics, minus a held-out "
                    "part); evaluation on WikiText-2 when ../shared is present, else on the held-out docs, "
                    f"{DEFAULTS['eval_tokens']} tokens in windows of {DEFAULTS['eval_seq_len']}.")
    s.add_argument("model", nargs="?", default=DEFAULT_MODEL, help=f"model (default {DEFAULT_MODEL})")
    _method_args(s)
    _calib_args(s)
    s.add_argument("--out", required=True, help="output folder (written aside, then renamed into place); "
                   "must be new or empty unless it is a qcore output and --overwrite is given")
    s.add_argument("--overwrite", action="store_true", help="replace --out if it holds an earlier qcore output "
                   "(and nothing else)")
    s.add_argument("--eval", action="store_true", help="report float vs quantized perplexity and size")
    s.add_argument("--stream", action="store_true", help="models larger than memory: read MODEL (a folder of "
                   "safetensors) one block at a time and write each finished block; an interrupted run resumes "
                   "when the same command is run again")
    s.add_argument("--restart", action="store_true", help="with --stream: discard the state of an interrupted "
                   "run instead of resuming it")
    _eval_args(s)
    _source_args(s)
    _json_arg(s)
    s.set_defaults(func=cmd_quantize)

    s = sub.add_parser("eval", help="perplexity of a model or a qcore checkpoint")
    s.add_argument("model", help="model name, HF directory or qcore checkpoint directory")
    _eval_args(s)
    s.add_argument("--stream", action="store_true", help="models larger than memory: read MODEL (a qcore "
                   "checkpoint or a folder of safetensors) one block at a time and run every window through it")
    _tokenizer_arg(s)
    _source_args(s)
    _json_arg(s)
    s.set_defaults(func=cmd_eval)

    s = sub.add_parser("info", help="per-layer bits, group and bytes of a qcore checkpoint")
    s.add_argument("path", help="qcore checkpoint directory")
    s.add_argument("--plot", metavar="IMAGE", help="also draw per-layer bits and relative weight error into "
                   "this image (.png, .pdf, .svg; needs matplotlib)")
    s.add_argument("--kernels", action="store_true",
                   help="also load the model and show which kernel path each layer shape takes at 1, 8, 32, 256 "
                   "and 2048 activation rows on this machine (measured on first use, seconds per shape)")
    _json_arg(s)
    s.set_defaults(func=cmd_info)

    s = sub.add_parser("export", help="write a qcore checkpoint in another runtime's format",
                       description="Export the qcore checkpoint DIR to --format (checked first: what the "
                                   "format cannot hold is refused before anything is written).")
    s.add_argument("path", metavar="DIR", help="qcore checkpoint directory")
    s.add_argument("--format", required=True,
                   help="compressed-tensors (pack-quantized 4/8-bit weight-only, or W8A8: transformers and vLLM "
                        "load it), gptq (GPTQModel/AutoGPTQ layout), awq (AutoAWQ GEMM layout) or gguf (one "
                        "llama.cpp file: Q4_0/Q4_1/Q8_0, groups of 32/64/128) or onnx (an onnxruntime decoder: "
                        "MatMulNBits, KV cache, onnxruntime-genai names)")
    s.add_argument("--out", required=True, help="output folder (or file, for gguf)")
    s.add_argument("--lm-head-bits", type=int, choices=(4, 8), default=None,
                   help="onnx only: write a float LM head quantized to 8 (per channel) or 4 bits (blocks of 32) "
                        "by round-to-nearest (the embedding stays float); default: exact float")
    s.add_argument("--overwrite", action="store_true", help="replace an earlier export at --out")
    _json_arg(s)
    s.set_defaults(func=cmd_export)

    s = sub.add_parser("finetune", help="fine-tune a QLoRA adapter (needs qcore-quant-qlora)")
    s.add_argument("model", nargs="?", default=DEFAULT_MODEL)
    s.add_argument("--data", required=True, help="training text: file, directory, or a corpus name")
    s.add_argument("--out", required=True, help="output directory for adapter checkpoints")
    _tokenizer_arg(s)
    s.add_argument("--steps", type=int, default=200)
    s.add_argument("--lr", type=float, default=2e-4)
    s.add_argument("--batch-size", type=int, default=4)
    s.add_argument("--seq-len", type=int, default=256)
    s.add_argument("--save-every", type=int, default=50)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--then", help="after training, merge and quantize with this method (e.g. gptq)")
    s.add_argument("-o", "--option", action="append", default=[], metavar="KEY=VALUE",
                   help="qlora option (r=16, alpha=32, ...) or, with --then, that method's option")
    s.add_argument("--bits", type=int, help="bits for --then")
    s.add_argument("--group-size", type=int, help="group size for --then")
    _source_args(s)
    _json_arg(s)
    s.set_defaults(func=cmd_finetune)
    return p


def _json_arg(s: argparse.ArgumentParser) -> None:
    from qcore.cli_output import JSON_STDOUT

    s.add_argument("--json", nargs="?", const=JSON_STDOUT, metavar="FILE",
                   help="print the result as JSON on stdout instead of text; --json FILE: print the text "
                   "and write the JSON to FILE")


def _source_args(s: argparse.ArgumentParser) -> None:
    s.add_argument("--revision", help="branch, tag or commit of a Hugging Face Hub model id (org/name)")
    s.add_argument("--trust-pickle", action="store_true", help="allow reading pickle-based *.bin weights "
                   "when the model has no safetensors (pickle can run code: only for sources you trust)")


def _method_args(s: argparse.ArgumentParser) -> None:
    s.add_argument("--method", "-m", nargs="+", default=["rtn"], help="method or chain (e.g. awq gptq); default rtn")
    s.add_argument("--bits", type=int, help="weight bits")
    s.add_argument("--group-size", type=int, help="columns per scale (-1 = per channel)")
    s.add_argument("--sym", action=argparse.BooleanOptionalAction, default=None, help="symmetric grid")
    s.add_argument("--a-bits", type=int, help="activation bits (option a_bits of the methods that have it, "
                   "e.g. quarot, smoothquant)")
    s.add_argument("--kv-bits", type=int, help="KV-cache bits (option kv_bits of the methods that have it, e.g. quarot)")
    s.add_argument("--ignore", nargs="+", metavar="PATTERN", help="module name patterns to keep in float "
                   "(fnmatch, e.g. '*.mlp.down_proj')")
    s.add_argument("--budget-bits", type=float, help="mixed precision: average bits per weight (scales and zero "
                   "points included, e.g. 3.5); per-layer widths chosen by sensitivity (-o budget_candidates=[2,3,4,8], "
                   "-o budget_criterion=fisher|hessian|fisher_diag)")
    s.add_argument("--budget-bytes", type=int, help="mixed precision: packed bytes of the quantized linears")
    s.add_argument("-o", "--option", action="append", default=[], metavar="KEY=VALUE",
                   help="any other method option; VALUE is parsed as JSON when it can be")
    s.add_argument("--config", help="JSON file of options")


def _calib_args(s: argparse.ArgumentParser) -> None:
    s.add_argument("--calibration", help="calibration text: file, .jsonl, directory or corpus name (c4, wikitext2)")
    s.add_argument("--n-samples", type=int, default=DEFAULTS["n_samples"])
    s.add_argument("--seq-len", type=int, help=f"calibration window length (default {DEFAULTS['seq_len']}, or the "
                   "model's positions when fewer)")
    _tokenizer_arg(s)
    s.add_argument("--seed", type=int, default=DEFAULTS["seed"])
    s.add_argument("--device", help="device for the per-block work (cpu, cuda)")


def _tokenizer_arg(s: argparse.ArgumentParser) -> None:
    s.add_argument("--tokenizer", help="folder (or name) to load the tokenizer from, when the model's own "
                   "folder has none or another is wanted")


def _eval_args(s: argparse.ArgumentParser) -> None:
    s.add_argument("--data", default="auto", help="eval text: file or corpus name; auto = wikitext2 if "
                   "available, else held-out Python docs")
    s.add_argument("--eval-seq-len", type=int, help=f"evaluation window length (default {DEFAULTS['eval_seq_len']}, "
                   "or the model's positions when fewer)")
    s.add_argument("--eval-tokens", type=int, default=DEFAULTS["eval_tokens"], help="max tokens evaluated")


def parse_options(args: argparse.Namespace) -> dict[str, Any]:
    """Method options from --config, -o KEY=VALUE and the named flags."""
    options: dict[str, Any] = {}
    if getattr(args, "config", None):
        options.update(_read_config(args.config))
    for item in args.option:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"option {item!r} is not KEY=VALUE (for example -o damp_percent=0.02)")
        try:
            options[key.strip().replace("-", "_")] = json.loads(value)
        except json.JSONDecodeError:
            options[key.strip().replace("-", "_")] = value
    for name in ("bits", "group_size", "sym", "ignore", "a_bits", "kv_bits"):
        if getattr(args, name, None) is not None:
            options[name] = getattr(args, name)
    for name in ("budget_bits", "budget_bytes"):  # qcore.quantize's own size budget
        if getattr(args, name, None) is not None:
            options[name] = getattr(args, name)
    return options


# -- commands -------------------------------------------------------------------------------------
def cmd_list(args: argparse.Namespace) -> int:
    from qcore.registry import get_registry

    reg = get_registry()
    rows = [("method", "kind", "weight bits", "act bits", "calibration", "summary")]
    for name in sorted(reg.methods):
        c = reg.methods[name].capabilities
        rows.append((name, c.kind, ",".join(map(str, c.weight_bits)) or "-",
                     ",".join(map(str, c.activation_bits)) or "-", "yes" if c.needs_calibration else "no",
                     reg.methods[name].summary))
    failed = [p for p in reg.plugins.values() if p.status == "failed"]
    text = _table(rows)
    if failed:
        text += f"\n\n{len(failed)} plugin(s) failed to load: {', '.join(p.name for p in failed)} (see 'qcore plugins')"
    data = {"methods": [{"method": r[0], "kind": r[1], "weight_bits": list(reg.methods[r[0]].capabilities.weight_bits),
                         "activation_bits": list(reg.methods[r[0]].capabilities.activation_bits),
                         "needs_calibration": r[4] == "yes", "summary": r[5],
                         "distribution": reg.methods[r[0]].distribution} for r in rows[1:]],
            "failed_plugins": [p.name for p in failed]}
    emit(args.json, data, text)
    return 0


def cmd_plugins(args: argparse.Namespace) -> int:
    from qcore.registry import list_plugins

    rows = [("plugin", "distribution", "version", "status", "methods")]
    for p in list_plugins():
        rows.append((p.name, p.distribution or "-", p.version or "-", p.status, ",".join(p.methods) or "-"))
    errors = [f"{p.name}: {p.error}" for p in list_plugins() if p.error]  # whole lines, under the table
    emit(args.json, [{"plugin": p.name, "distribution": p.distribution, "version": p.version, "status": p.status,
                      "methods": list(p.methods), "error": p.error} for p in list_plugins()],
         _table(rows) + ("\n\nerrors:\n" + "\n".join(errors) if errors else ""))
    if args.debug:
        for p in list_plugins():
            if p.traceback:
                print(f"\n--- {p.name} ---\n{p.traceback}", file=sys.stderr)
    return 0


def cmd_compat(args: argparse.Namespace) -> int:
    from qcore.compat import installed_specs, matrix_rows, render_markdown

    if args.markdown:
        emit(args.json, matrix_rows(), render_markdown())
        return 0
    rows = [("method", "plugin", "weight bits", "act bits", "group sizes", "calib", "architectures")]
    by_method: dict[str, list[dict[str, Any]]] = {}
    for r in matrix_rows():
        by_method.setdefault(r["method"], []).append(r)
    for spec in installed_specs():
        fams = by_method.get(spec.name, [])
        ok = [r["family"] for r in fams if r["supported"]]
        c = spec.capabilities
        rows.append((spec.name, spec.distribution or spec.plugin, ", ".join(map(str, c.weight_bits)) or "-",
                     ", ".join(map(str, c.activation_bits)) or "-", ", ".join(map(str, c.group_sizes)) or "-",
                     "yes" if c.needs_calibration else "no", "all" if len(ok) == len(fams) else ", ".join(ok) or "none"))
    emit(args.json, matrix_rows(), _table(rows) + "\n\nchains, rules and every option: qcore compat --markdown")
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    from qcore.compat import check

    options = parse_options(args)
    method = args.method if len(args.method) > 1 else args.method[0]
    verdict = check(None, method, **options)  # the options alone, before the model is loaded
    if verdict.ok:
        model, _ = _load_model(args.model, args)
        verdict = check(model, method, **options)
    lines = [("OK: " if verdict.ok else "REFUSED: ") + " + ".join(args.method) + f" on {args.model}"]
    lines += [f"  - {flag_words(r)}" for r in verdict.reasons]
    lines += [f"  * {flag_words(r)}" for r in verdict.recommendations]
    emit(args.json, {"ok": verdict.ok, "model": args.model, "method": args.method, "options": options,
                     "reasons": [flag_words(r) for r in verdict.reasons],
                     "recommendations": [flag_words(r) for r in verdict.recommendations]}, "\n".join(lines))
    return 0 if verdict.ok else 1


def cmd_quantize(args: argparse.Namespace) -> int:
    import qcore
    from qcore import checkpoint

    options = parse_options(args)
    inputs = (args.model,) if Path(args.model).expanduser().exists() else ()
    checkpoint.check_target(args.out, args.overwrite, inputs)  # before the slow work
    _check_options_early(args, options)
    rank, size = _join_processes(args)
    if args.stream:
        return _quantize_streaming(args, options)
    if args.restart:
        raise ConfigError("--restart applies to streamed runs: add --stream")
    model, tok = _load_model(args.model, args)
    tok = _tokenizer(args, tok)
    _require_tokenizer(args, options, tok)
    calib_source, eval_texts, eval_name = _sources(args)
    report: dict[str, Any] = {"model": args.model, "method": args.method, "options": options}
    evaluate = args.eval and rank == 0  # one process evaluates and writes
    if evaluate:  # the model checks first: evaluating the float model is slow
        qcore.check(model, args.method if len(args.method) > 1 else args.method[0], **options).raise_if_failed()
        report["float"] = _perplexity(model, tok, eval_texts, args)
        report["float"]["sizes"] = _sizes(model)
    start = time.perf_counter()
    qcore.quantize(model, args.method if len(args.method) > 1 else args.method[0], calibration=calib_source,
                   tokenizer=tok, n_samples=args.n_samples, seq_len=args.seq_len, seed=args.seed,
                   device=args.device, **options)
    report["quantize_seconds"] = round(time.perf_counter() - start, 2)
    if rank != 0:
        log.info("process %d of %d: done (process 0 writes %s)", rank, size, args.out)
        return 0
    if size > 1:
        report["processes"] = size
    out = checkpoint.save(model, args.out, tokenizer=tok, overwrite=args.overwrite)
    report["out"] = str(out)
    if evaluate:
        reloaded = checkpoint.load(out)
        report["quantized"] = _perplexity(reloaded, tok, eval_texts, args)
        report["quantized"]["sizes"] = _sizes(reloaded)
        report["eval_data"] = eval_name
        _record_evaluation(out, report)
        text = _quantize_report(report)
    else:
        text = f"saved {out} ({' + '.join(args.method)}, {report['quantize_seconds']} s)"
    emit(args.json, report, text)
    return 0


def _join_processes(args: argparse.Namespace) -> tuple[int, int]:
    """Under torchrun with several processes: join the process group (gloo on CPU, NCCL for
    ``--device cuda``) so that they share the calibration windows; ``(rank, world size)``."""
    from qcore.pipeline.distributed import init_from_env, launched_distributed

    if not launched_distributed():
        return 0, 1
    if args.stream:
        raise ConfigError("--stream keeps one state folder and cannot be shared by several processes; run it "
                          "without torchrun, or drop --stream to load the model whole in every process")
    return init_from_env(args.device)


def _record_evaluation(out: Path, report: dict[str, Any]) -> None:
    """The evaluation of ``qcore quantize --eval`` into the checkpoint's record and model card."""
    from qcore.checkpoint.card import portable_name, record_evaluation

    q = report["quantized"]
    record_evaluation(out, {"data": portable_name(str(report["eval_data"])), "perplexity": q["perplexity"],
                            "float_perplexity": report["float"]["perplexity"], "tokens": q["tokens"],
                            "seq_len": q["seq_len"]})


def _quantize_streaming(args: argparse.Namespace, options: dict[str, Any]) -> int:
    """``qcore quantize DIR --stream --out OUT``: block by block from the safetensors files."""
    import qcore

    if args.eval:
        raise ConfigError("--eval loads the float model whole, which --stream avoids: evaluate the output "
                          "afterwards with: qcore eval OUT")
    tok = _tokenizer(args, None)
    calib_source, _, _ = _sources(args)  # the calibration text of an in-memory run
    start = time.perf_counter()
    out = qcore.quantize(args.model, args.method if len(args.method) > 1 else args.method[0],
                         calibration=calib_source, tokenizer=tok, n_samples=args.n_samples, seq_len=args.seq_len,
                         seed=args.seed, device=args.device, out=args.out, overwrite=args.overwrite,
                         restart=args.restart, **options)
    seconds = round(time.perf_counter() - start, 2)
    emit(args.json, {"model": args.model, "method": args.method, "options": options, "out": str(out),
                     "quantize_seconds": seconds, "stream": True},
         f"saved {out} ({' + '.join(args.method)}, streamed, {seconds} s)")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    _check_options_early(args, None)
    if args.stream:
        _, texts, name = _sources(args)
        res = _perplexity_streamed(args, texts)
    else:
        model, tok = _load_model(args.model, args)
        tok = _tokenizer(args, tok)
        _, texts, name = _sources(args)
        res = _perplexity(model, tok, texts, args)
    emit(args.json, {"model": args.model, "data": name, **res},
         _table([("model", "data", "tokens", "seq_len", "perplexity"),
                 (args.model, name, str(res["tokens"]), str(res["seq_len"]), f"{res['perplexity']:.3f}")]))
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from qcore.checkpoint import describe_checkpoint, format_info
    from qcore.cli_output import plot_layers

    desc = describe_checkpoint(args.path)
    text = format_info(desc)
    if args.kernels:
        import qcore
        from qcore.cli_output import table
        from qcore.quant.paths import format_kernel_paths, kernel_paths

        desc["kernel_paths"] = kernel_paths(qcore.load(args.path))
        text += "\n\nkernel path per activation rows (this machine):\n" + table(format_kernel_paths(desc["kernel_paths"]))
    if args.plot:
        text += f"\nplot: {plot_layers(desc, args.plot)}"
    emit(args.json, desc, text)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from qcore.formats import export

    options = {} if args.lm_head_bits is None else {"lm_head_bits": args.lm_head_bits}
    out = export(args.path, args.out, args.format, overwrite=args.overwrite, **options)
    emit(args.json, {"path": args.path, "format": args.format, "out": str(out)},
         f"exported {args.path} as {args.format} to {out}")
    return 0


def cmd_finetune(args: argparse.Namespace) -> int:
    import qcore

    model, tok = _load_model(args.model, args)
    tok = _tokenizer(args, tok)
    options = parse_options(argparse.Namespace(option=args.option, config=None))
    then_options = {k: v for k, v in (("bits", args.bits), ("group_size", args.group_size)) if v is not None}
    qcore.quantize(model, "qlora", **options)
    result = qcore.finetune(model, args.data, tokenizer=tok, steps=args.steps, lr=args.lr,
                            batch_size=args.batch_size, seq_len=args.seq_len, save_every=args.save_every,
                            output_dir=args.out, seed=args.seed, then=args.then, then_options=then_options)
    emit(args.json, jsonable(result), str(result))
    return 0


# -- helpers --------------------------------------------------------------------------------------
def _read_config(path: str) -> dict[str, Any]:
    """The options of a ``--config`` JSON file; every failure names the file."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"--config {path}: cannot read it ({getattr(exc, 'strerror', None) or exc})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"--config {path} is not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg}); "
                          'write one object of options such as {"bits": 4, "group_size": 128}') from None
    if not isinstance(data, dict):
        raise ConfigError(f"--config {path} holds a JSON {type(data).__name__}, not an object of options such "
                          'as {"bits": 4, "group_size": 128}')
    return data


def _check_options_early(args: argparse.Namespace, options: dict[str, Any] | None) -> None:
    """Everything the options alone decide, before the (slow) model load."""
    from qcore.compat import check
    from qcore.pipeline import validate

    if options is not None:
        verdict = check(None, args.method if len(args.method) > 1 else args.method[0], **options)
        verdict.raise_if_failed()
        validate.check_run_options(args.n_samples, args.seq_len, args.seed)
        validate.check_device(args.device)
    if getattr(args, "eval", True):
        validate.positive_int(args.eval_tokens, "eval_tokens")
        if args.eval_seq_len is not None:
            validate.positive_int(args.eval_seq_len, "eval_seq_len", minimum=2)


def _require_tokenizer(args: argparse.Namespace, options: dict[str, Any], tok: Any) -> None:
    """A model without a tokenizer can be quantized only by methods that read no text."""
    if tok is not None:
        return
    from qcore.registry import get_method

    needs = [m for m in args.method if get_method(m).capabilities.needs_calibration]
    if any(k.startswith("budget_") for k in options):
        needs.append("--budget-bits/--budget-bytes")
    if args.eval:
        needs.append("--eval")
    if needs:
        raise ConfigError(f"{args.model} comes without a tokenizer, and {', '.join(needs)} need(s) one to read "
                          "text: pass --tokenizer FOLDER (a folder holding this model's tokenizer files)")


def _tokenizer(args: argparse.Namespace, tok: Any) -> Any:
    """The model's tokenizer, or the one ``--tokenizer`` names."""
    if not getattr(args, "tokenizer", None):
        return tok
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(args.tokenizer)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"--tokenizer {args.tokenizer}: no tokenizer could be loaded from it "
                          f"({str(exc).splitlines()[0]}); give a folder holding tokenizer.json or "
                          "tokenizer_config.json") from None


_VALUE = r"""(\[[^\]]*\]|'[^']*'|"[^"]*"|[^\s,;)]*)"""


def _flag_map() -> dict[str, str]:
    """Python keyword name -> CLI flag, for every long flag of every command."""
    flags: dict[str, str] = {}
    for action in build_parser()._subparsers._group_actions[0].choices.values():  # type: ignore[union-attr]
        for a in action._actions:
            longs = [o for o in a.option_strings if o.startswith("--")]
            if longs and a.dest not in ("help", "debug", "verbose", "json", "eval", "option"):
                flags.setdefault(a.dest, longs[0])
    return flags


def _switches() -> set[str]:
    """Python keyword names of the flags that take no value (``--overwrite``)."""
    return {a.dest for sp in build_parser()._subparsers._group_actions[0].choices.values()  # type: ignore[union-attr]
            for a in sp._actions if isinstance(a, argparse._StoreTrueAction)}


def flag_words(text: str) -> str:
    """A library message in the CLI's words: ``seq_len=600`` -> ``--seq-len 600``,
    ``ignore=["*.x"]`` -> ``--ignore '*.x'``, ``n_samples`` -> ``--n-samples``."""
    import ast
    import re

    flags = _flag_map()
    names = "|".join(sorted(map(re.escape, flags), key=len, reverse=True))

    def value_words(raw: str) -> str:
        if raw.startswith("["):
            try:
                items = ast.literal_eval(raw)
            except (ValueError, SyntaxError):
                return raw
            return " ".join(f"'{i}'" if any(c in str(i) for c in "*?[] ") else str(i) for i in items)
        return raw.strip("'\"")

    def keyword(m: re.Match) -> str:
        value = value_words(m.group(2))
        if value == "True" and m.group(1) in _switches():  # a store_true flag takes no value
            value = ""
        return flags[m.group(1)] + (f" {value}" if value else "")

    text = re.sub(rf"(?<![\w.-])({names})={_VALUE}", keyword, text)
    from qcore.registry import get_registry

    others = {o for spec in get_registry().methods.values() for o in spec.config_cls.option_names()} - set(flags)
    if others:
        alt = "|".join(sorted(map(re.escape, others), key=len, reverse=True))
        text = re.sub(rf"(?<![\w.-])({alt})=(?=\S)", r"-o \1=", text)
    underscored = "|".join(re.escape(n) for n in sorted(flags, key=len, reverse=True) if "_" in n)
    return re.sub(rf"(?<![\w.\"-])({underscored})(?![\w=\"])", lambda m: flags[m.group(1)], text)


def _load_model(name: str, args: argparse.Namespace | None = None) -> tuple[Any, Any]:
    """A qcore checkpoint directory, a Hugging Face directory, a Hub id, or a known model name."""
    revision = getattr(args, "revision", None)
    allow_pickle = bool(getattr(args, "trust_pickle", False))
    path = Path(name)
    cfg = path / "config.json"
    if cfg.is_file() and "quantization_config" in json.loads(cfg.read_text()):
        from qcore.checkpoint import load, load_tokenizer

        from qcore.plugin.errors import CheckpointError

        model = load(path)
        try:
            return model, load_tokenizer(path)
        except CheckpointError:  # saved without one: --tokenizer can give it
            return model, None
    from qcore.models import load_model

    return load_model(name, revision=revision, allow_pickle=allow_pickle)


def _sources(args: argparse.Namespace) -> tuple[Any, list[str], str]:
    """(calibration source, eval texts, eval name), keeping calibration and eval text disjoint."""
    from qcore.data import read_texts

    calib = getattr(args, "calibration", None)
    if args.data not in ("auto", "docs"):
        return calib, read_texts(args.data), args.data
    if args.data == "auto":
        try:
            return calib, read_texts("wikitext2"), "wikitext2"
        except QcoreError:
            pass
    train, heldout = docs_split()
    return (train if calib is None else calib), heldout, "python-docs-heldout"


def docs_split(heldout_fraction: float = 0.15) -> tuple[list[str], list[str]]:
    """The standard library's pydoc topics split deterministically into calibration and held-out text."""
    from pydoc_data.topics import topics

    keys = sorted(topics)
    n_held = max(1, int(len(keys) * heldout_fraction))
    return [topics[k] for k in keys[:-n_held]], [topics[k] for k in keys[-n_held:]]


def _perplexity(model: Any, tok: Any, texts: list[str], args: argparse.Namespace) -> dict[str, Any]:
    from qcore.eval import perplexity

    from qcore.pipeline.validate import check_seq_len

    seq_len = args.eval_seq_len
    seq_len = check_seq_len(model, seq_len, "eval_seq_len") if seq_len is not None else \
        min(DEFAULTS["eval_seq_len"], check_seq_len(model, None))
    start = time.perf_counter()
    res = perplexity(model, texts, tokenizer=tok, seq_len=seq_len, max_tokens=args.eval_tokens)
    return {"perplexity": float(res.ppl), "tokens": int(res.n_predicted), "seq_len": seq_len,
            "seconds": round(time.perf_counter() - start, 2)}


def _perplexity_streamed(args: argparse.Namespace, texts: list[str]) -> dict[str, Any]:
    """``qcore eval DIR --stream``: :func:`qcore.eval.perplexity_streamed`, one block in memory at a time."""
    from qcore.eval import perplexity_streamed

    if getattr(args, "revision", None) is not None:
        raise ConfigError("--revision applies to Hub models, which --stream does not read: pass a local folder")
    cfg = Path(args.model) / "config.json"
    if args.eval_seq_len is not None and cfg.is_file():  # named as the flag, before the model is built
        from types import SimpleNamespace

        from qcore.pipeline.validate import check_seq_len

        config = SimpleNamespace(**json.loads(cfg.read_text(encoding="utf-8")))
        check_seq_len(SimpleNamespace(config=config), args.eval_seq_len, "eval_seq_len")
    tok = _tokenizer(args, None)
    res = perplexity_streamed(args.model, texts, tokenizer=tok, seq_len=args.eval_seq_len,
                              max_tokens=args.eval_tokens)
    return {"perplexity": float(res.ppl), "tokens": int(res.n_predicted), "seq_len": res.seq_len,
            "seconds": round(res.seconds, 2), "stream": True}


def _sizes(model: Any) -> dict[str, int]:
    """Model bytes as held in memory, and the quantized linears' bytes against the same in fp16."""
    from qcore.checkpoint import describe_checkpoint

    d = describe_checkpoint(model)
    return {k: int(d[k]) for k in ("total_bytes", "total_fp16_bytes", "quantized_bytes", "quantized_fp16_bytes")}


def _quantize_report(r: dict[str, Any]) -> str:
    f, q = r["float"], r["quantized"]
    rows = [("model", "perplexity", "model MB in memory", "eval s"),
            ("float", f"{f['perplexity']:.3f}", f"{f['sizes']['total_bytes'] / 1e6:.2f}", str(f["seconds"])),
            (" + ".join(r["method"]), f"{q['perplexity']:.3f}", f"{q['sizes']['total_bytes'] / 1e6:.2f}",
             str(q["seconds"]))]
    qs = q["sizes"]
    ratio = qs["quantized_bytes"] / max(qs["quantized_fp16_bytes"], 1)
    return (f"{r['model']} on {r['eval_data']} ({q['tokens']} predicted tokens); quantized in "
            f"{r['quantize_seconds']} s; saved to {r['out']} and reloaded from it\n{_table(rows)}\n"
            f"quantized linears: {qs['quantized_bytes'] / 1e6:.2f} MB vs {qs['quantized_fp16_bytes'] / 1e6:.2f} MB "
            f"in fp16 ({ratio:.3f}x); perplexity {q['perplexity'] - f['perplexity']:+.3f} vs float")


def _table(rows: list[tuple[str, ...]]) -> str:
    from qcore.cli_output import table

    return table(rows)


def emit(target: str | None, data: Any, text: str | None) -> None:
    from qcore.cli_output import emit as _emit

    _emit(target, data, text)


def jsonable(obj: Any) -> Any:
    from qcore.cli_output import jsonable as _jsonable

    return _jsonable(obj)


if __name__ == "__main__":
    sys.exit(main())
