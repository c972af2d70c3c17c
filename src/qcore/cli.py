"""The ``qcore`` command. Errors print as one line and exit non-zero (``--debug`` for tracebacks)."""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

from qcore.plugin.errors import ConfigError, QcoreError

DEFAULT_MODEL = "smollm2-135m"
DEFAULTS = {"n_samples": 64, "seq_len": 512, "seed": 0, "eval_seq_len": 512, "eval_tokens": 16384}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except (QcoreError, FileNotFoundError, ValueError) as exc:
        if args.debug:
            raise
        print(f"qcore: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("qcore: interrupted; no output was written in place", file=sys.stderr)
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
    s.set_defaults(func=cmd_list)

    s = sub.add_parser("plugins", help="show loaded plugins, their versions and errors")
    s.set_defaults(func=cmd_plugins)

    s = sub.add_parser("compat", help="print the compatibility matrix (method x architecture x option)")
    s.set_defaults(func=cmd_compat)

    s = sub.add_parser("check", help="check whether a method can quantize a model with these options")
    s.add_argument("model", help=f"model name ({DEFAULT_MODEL}, stories260k) or local directory")
    _method_args(s)
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
    _eval_args(s)
    s.add_argument("--json", help="also write the report as JSON to this file")
    s.set_defaults(func=cmd_quantize)

    s = sub.add_parser("eval", help="perplexity of a model or a qcore checkpoint")
    s.add_argument("model", help="model name, HF directory or qcore checkpoint directory")
    _eval_args(s)
    s.add_argument("--json", help="write results as JSON to this file")
    s.set_defaults(func=cmd_eval)

    s = sub.add_parser("info", help="per-layer bits, group and bytes of a qcore checkpoint")
    s.add_argument("path", help="qcore checkpoint directory")
    s.set_defaults(func=cmd_info)

    s = sub.add_parser("finetune", help="fine-tune a QLoRA adapter (needs qcore-qlora)")
    s.add_argument("model", nargs="?", default=DEFAULT_MODEL)
    s.add_argument("--data", required=True, help="training text: file, directory, or a corpus name")
    s.add_argument("--out", required=True, help="output directory for adapter checkpoints")
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
    s.set_defaults(func=cmd_finetune)
    return p


def _method_args(s: argparse.ArgumentParser) -> None:
    s.add_argument("--method", "-m", nargs="+", default=["rtn"], help="method or chain (e.g. awq gptq); default rtn")
    s.add_argument("--bits", type=int, help="weight bits")
    s.add_argument("--group-size", type=int, help="columns per scale (-1 = per channel)")
    s.add_argument("--sym", action=argparse.BooleanOptionalAction, default=None, help="symmetric grid")
    s.add_argument("--ignore", nargs="+", metavar="PATTERN", help="module name patterns to keep in float "
                   "(fnmatch, e.g. '*.mlp.down_proj')")
    s.add_argument("-o", "--option", action="append", default=[], metavar="KEY=VALUE",
                   help="any other method option; VALUE is parsed as JSON when it can be")
    s.add_argument("--config", help="JSON file of options")


def _calib_args(s: argparse.ArgumentParser) -> None:
    s.add_argument("--calibration", help="calibration text: file, .jsonl, directory or corpus name (c4, wikitext2)")
    s.add_argument("--n-samples", type=int, default=DEFAULTS["n_samples"])
    s.add_argument("--seq-len", type=int, default=DEFAULTS["seq_len"])
    s.add_argument("--seed", type=int, default=DEFAULTS["seed"])
    s.add_argument("--device", help="device for the per-block work (cpu, cuda)")


def _eval_args(s: argparse.ArgumentParser) -> None:
    s.add_argument("--data", default="auto", help="eval text: file or corpus name; auto = wikitext2 if "
                   "available, else held-out Python docs")
    s.add_argument("--eval-seq-len", type=int, default=DEFAULTS["eval_seq_len"])
    s.add_argument("--eval-tokens", type=int, default=DEFAULTS["eval_tokens"], help="max tokens evaluated")


def parse_options(args: argparse.Namespace) -> dict[str, Any]:
    """Method options from --config, -o KEY=VALUE and the named flags."""
    options: dict[str, Any] = {}
    if getattr(args, "config", None):
        options.update(json.loads(Path(args.config).read_text()))
    for item in args.option:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"option {item!r} is not KEY=VALUE (for example -o damp_percent=0.02)")
        try:
            options[key.strip().replace("-", "_")] = json.loads(value)
        except json.JSONDecodeError:
            options[key.strip().replace("-", "_")] = value
    for name in ("bits", "group_size", "sym", "ignore"):
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
    print(_table(rows))
    failed = [p for p in reg.plugins.values() if p.status == "failed"]
    if failed:
        print(f"\n{len(failed)} plugin(s) failed to load: {', '.join(p.name for p in failed)} (see 'qcore plugins')")
    return 0


def cmd_plugins(args: argparse.Namespace) -> int:
    from qcore.registry import list_plugins

    rows = [("plugin", "distribution", "version", "status", "methods", "error")]
    for p in list_plugins():
        rows.append((p.name, p.distribution or "-", p.version or "-", p.status, ",".join(p.methods) or "-",
                     p.error or ""))
    print(_table(rows))
    if args.debug:
        for p in list_plugins():
            if p.traceback:
                print(f"\n--- {p.name} ---\n{p.traceback}")
    return 0


def cmd_compat(args: argparse.Namespace) -> int:
    from qcore.compat import render_markdown

    print(render_markdown())
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    from qcore.compat import check

    options = parse_options(args)
    model, _ = _load_model(args.model)
    verdict = check(model, args.method if len(args.method) > 1 else args.method[0], **options)
    print(("OK: " if verdict.ok else "REFUSED: ") + " + ".join(args.method) + f" on {args.model}")
    for r in verdict.reasons:
        print(f"  - {r}")
    for r in verdict.recommendations:
        print(f"  * {r}")
    return 0 if verdict.ok else 1


def cmd_quantize(args: argparse.Namespace) -> int:
    import qcore
    from qcore import checkpoint

    options = parse_options(args)
    inputs = (args.model,) if Path(args.model).expanduser().exists() else ()
    checkpoint.check_target(args.out, args.overwrite, inputs)  # before the slow work
    model, tok = _load_model(args.model)
    calib_source, eval_texts, eval_name = _sources(args)
    report: dict[str, Any] = {"model": args.model, "method": args.method, "options": options}
    if args.eval:
        report["float"] = _perplexity(model, tok, eval_texts, args)
        report["float"]["sizes"] = _sizes(model)
    start = time.perf_counter()
    qcore.quantize(model, args.method if len(args.method) > 1 else args.method[0], calibration=calib_source,
                   tokenizer=tok, n_samples=args.n_samples, seq_len=args.seq_len, seed=args.seed,
                   device=args.device, **options)
    report["quantize_seconds"] = round(time.perf_counter() - start, 2)
    out = checkpoint.save(model, args.out, tokenizer=tok, overwrite=args.overwrite)
    report["out"] = str(out)
    if args.eval:
        reloaded = checkpoint.load(out)
        report["quantized"] = _perplexity(reloaded, tok, eval_texts, args)
        report["quantized"]["sizes"] = _sizes(reloaded)
        report["eval_data"] = eval_name
        print(_quantize_report(report))
    else:
        print(f"saved {out} ({' + '.join(args.method)}, {report['quantize_seconds']} s)")
    if args.json:
        checkpoint.write_json(args.json, report, default=str)
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from qcore.checkpoint import write_json

    model, tok = _load_model(args.model)
    _, texts, name = _sources(args)
    res = _perplexity(model, tok, texts, args)
    print(_table([("model", "data", "tokens", "seq_len", "perplexity"),
                  (args.model, name, str(res["tokens"]), str(args.eval_seq_len), f"{res['perplexity']:.3f}")]))
    if args.json:
        write_json(args.json, {"model": args.model, "data": name, **res}, default=str)
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from qcore.checkpoint import describe_checkpoint, format_info

    print(format_info(describe_checkpoint(args.path)))
    return 0


def cmd_finetune(args: argparse.Namespace) -> int:
    import qcore

    model, tok = _load_model(args.model)
    options = parse_options(argparse.Namespace(option=args.option, config=None))
    then_options = {k: v for k, v in (("bits", args.bits), ("group_size", args.group_size)) if v is not None}
    qcore.quantize(model, "qlora", **options)
    result = qcore.finetune(model, args.data, tokenizer=tok, steps=args.steps, lr=args.lr,
                            batch_size=args.batch_size, seq_len=args.seq_len, save_every=args.save_every,
                            output_dir=args.out, seed=args.seed, then=args.then, then_options=then_options)
    print(result)
    return 0


# -- helpers --------------------------------------------------------------------------------------
def _load_model(name: str) -> tuple[Any, Any]:
    """A qcore checkpoint directory, a Hugging Face directory, or a known model name."""
    path = Path(name)
    cfg = path / "config.json"
    if cfg.is_file() and "quantization_config" in json.loads(cfg.read_text()):
        from qcore.checkpoint import load, load_tokenizer

        return load(path), load_tokenizer(path)
    from qcore.models import load_model

    return load_model(name)


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

    start = time.perf_counter()
    res = perplexity(model, texts, tokenizer=tok, seq_len=args.eval_seq_len, max_tokens=args.eval_tokens)
    return {"perplexity": float(res.ppl), "tokens": int(res.n_predicted),
            "seconds": round(time.perf_counter() - start, 2)}


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
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    lines = ["| " + " | ".join(str(c).ljust(w) for c, w in zip(r, widths)) + " |" for r in rows]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
