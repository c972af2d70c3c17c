"""The dashboard's report: results.md and plots from a run's results.json, and docs/results.md's section.

Loaded by bench/dashboard.py (``runpy``); also usable alone to redraw a finished run:

    .venv/bin/python bench/dashboard_report.py bench/out/<date>-<cpu>/<suite> [--update-docs]
"""
from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path
from typing import Any

MB = 1e6
PLOTS = {"quality": ("pareto.png", "quantize_time.png"), "speed": ("decode.png", "kernels.png")}
"""Plot files per suite kind."""


def _load(folder: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    data = json.loads((folder / "results.json").read_text())
    return data["header"], data["rows"]


def _fmt(v: Any, digits: int = 3) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def _label(r: dict[str, Any]) -> str:
    return r["method"] + " (qcore)" if r["tool"] == "qcore" else r["tool"]


def quality_markdown(header: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    """The table of a quality suite: the float row, then each bit width best first."""
    s = header["setup"]
    lines = [f"Suite `{header['suite']}`: {s['model']}, group {s['group_size']}"
             + (f", kept float: {', '.join(s['ignore'])}" if s["ignore"] else "")
             + f"; calibration {s['calibration']} {s['n_samples']}x{s['seq_len']} (seed 0, the same token ids for"
             f" every tool); perplexity on the first {s['eval_tokens']} tokens of {s['eval_text']} in"
             f" {s['eval_seq_len']}-token windows ({header['eval_predicted']} predicted tokens), every model"
             f" evaluated whole. {header['cpu']}, {header['threads']} threads, {header['date']};"
             f" run wall time {header.get('wall_s', 0) / 60:.1f} min"
             + (f", load average {header['load_average'][0]:.1f} at start / {header['load_average'][1]:.1f} at end"
                if header.get("load_average") else "")
             + ("" if header.get("complete") else " (INCOMPLETE: narrowed to some methods or peers, or jobs left to run)") + ".",
             f"Command: `{header['command']}`. Versions: "
             + ", ".join(f"{k} {v}" for k, v in sorted(header["versions"].items())) + ".",
             "",
             "Packed MB: the block linears' codes plus an fp16 scale and zero per group (`storage` bits and"
             " group; the same formula for every tool), float linears at 2 bytes; embeddings and LM head"
             " not counted. Quantize (s): the job's wall time, with the load average when it started and ended"
             " (a load above the thread count means other work shared the CPU).",
             "",
             "| bits | method | perplexity | vs float | packed MB | quantize (s) | peak RSS (GB) | version | note |",
             "|---|---|---|---|---|---|---|---|---|",
             f"| 16 | float | {header['float_ppl']:.3f} | - | {header['float_bytes'] / MB:.2f} | - | - | - | |"]
    for bits in sorted({r["bits"] for r in rows}, reverse=True):
        group = sorted((r for r in rows if r["bits"] == bits),
                       key=lambda r: (r.get("ppl") is None, r.get("ppl") or 0.0))
        for r in group:
            ppl = _fmt(r.get("ppl")) if r.get("ppl") is not None else "did not run" if "peer_ppl" not in r else "void"
            vs = f"{r['ppl'] / header['float_ppl']:.2f}x" if r.get("ppl") is not None else "-"
            rss = f"{r['peak_rss_bytes'] / 1e9:.2f}" if r.get("peak_rss_bytes") else "-"
            note = r.get("error") or r.get("note") or ""
            load = r.get("load_average")
            secs = _fmt(r.get("quantize_s"), 1) + (f" (load {load[0]:.1f}/{load[1]:.1f})" if load else "")
            lines.append(f"| {bits} | {_label(r)} | {ppl} | {vs} | {r['packed_bytes'] / MB:.2f} | "
                         f"{secs} | {rss} | {r.get('tool_version', '-')} | "
                         f"{note.replace('|', '/')} |")
    return "\n".join(lines) + "\n"


def speed_markdown(header: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    """The tables of the speed suite: kernels (ms, int4 vs fp32) and decoding (tokens/s)."""
    lines = [f"Suite `speed`: {header['cpu']}, {header['threads']} threads, {header['date']}. Command: "
             f"`{header['command']}`.", "", "Kernels (bench/kernels.py; ms per call, median of interleaved rounds):", "",
             "| shape (in x out) | batch | int4 path | fp32 ms | bf16 ms | int4 ms | int4 vs fp32 | int4 vs faster float |",
             "|---|---|---|---|---|---|---|---|"]
    for r in (r for r in rows if r["bench"] == "kernels"):
        if r.get("error"):
            lines.append(f"| did not run | | | | | | | {r['error']} |")
            continue
        lines.append(f"| {r['shape']} | {r['batch']} | {r['int4_path']} | {_fmt(r['fp32_ms'])} | {_fmt(r['bf16_ms'])} | "
                     f"{_fmt(r['int4_ms'])} | {_fmt(r['int4_vs_fp32'], 2)}x | {_fmt(r.get('int4_vs_best_float'), 2)}x |")
    lines += ["", "Greedy decoding of the default model (bench/decode.py; llama.cpp on the same model's GGUF file):", "",
              "| variant | tokens/s | vs float32 | backends |", "|---|---|---|---|"]
    for r in (r for r in rows if r["bench"] == "decode"):
        if r.get("error"):
            lines.append(f"| {r['variant']} | did not run: {r['error'].replace('|', '/')} | | |")
            continue
        lines.append(f"| {r['variant']} | {r['tokens_per_s']} | {r.get('vs_float32', '-')} | {r.get('backends', '-')} |")
    return "\n".join(lines) + "\n"


def _pareto(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The points no other point beats in both size and perplexity, by size."""
    front, best = [], float("inf")
    for x, y in sorted(points):
        if y < best:
            front.append((x, y))
            best = y
    return front


def quality_plots(folder: Path, header: dict[str, Any], rows: list[dict[str, Any]]) -> None:
    """Perplexity against packed bytes (every row that has one) and quantize time per job."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if r.get("ppl") is not None]
    fig, ax = plt.subplots(figsize=(9, 6))
    labels = sorted({_label(r) for r in ok})
    cmap = plt.get_cmap("tab20")
    for i, label in enumerate(labels):
        pts = [(r["packed_bytes"] / MB, r["ppl"]) for r in ok if _label(r) == label]
        marker = "o" if label.endswith("(qcore)") else "^"
        ax.scatter(*zip(*pts), label=label, marker=marker, color=cmap(i % 20), s=40, zorder=3)
    ax.scatter([header["float_bytes"] / MB], [header["float_ppl"]], marker="*", s=120, color="black",
               label="float (fp16 size)", zorder=3)
    front = _pareto([(r["packed_bytes"] / MB, r["ppl"]) for r in ok] + [(header["float_bytes"] / MB,
                                                                      header["float_ppl"])])
    ax.plot(*zip(*front), color="grey", lw=1, ls="--", label="Pareto front", zorder=2)
    ax.set_yscale("log")
    ax.set_xlabel("packed MB of the block linears")
    ax.set_ylabel("perplexity (log scale)")
    s = header["setup"]
    ax.set_title(f"{s['model']}: perplexity against size ({header['date']}, {header['cpu']})", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(folder / "pareto.png", dpi=110)
    plt.close(fig)

    timed = [r for r in rows if r.get("quantize_s") is not None]
    timed.sort(key=lambda r: (r["bits"], _label(r)))
    fig, ax = plt.subplots(figsize=(9, max(3.0, 0.28 * len(timed) + 1)))
    names = [f"w{r['bits']} {_label(r)}" for r in timed]
    colors = ["tab:blue" if r["tool"] == "qcore" else "tab:orange" for r in timed]
    ax.barh(range(len(timed)), [r["quantize_s"] for r in timed], color=colors)
    ax.set_yticks(range(len(timed)), names, fontsize=7)
    ax.set_xscale("log")
    ax.set_xlabel("quantize wall time (s, log scale; blue qcore, orange peers)")
    ax.set_title(f"{s['model']}: quantize time ({header['date']}, {header['cpu']})", fontsize=9)
    ax.grid(True, axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(folder / "quantize_time.png", dpi=110)
    plt.close(fig)


def speed_plots(folder: Path, header: dict[str, Any], rows: list[dict[str, Any]]) -> None:
    """Decode tokens/s per variant and the int4 kernel's speed against fp32 per batch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dec = [r for r in rows if r["bench"] == "decode" and r.get("tokens_per_s")]
    fig, ax = plt.subplots(figsize=(8, max(3.0, 0.4 * len(dec) + 1)))
    ax.barh(range(len(dec)), [r["tokens_per_s"] for r in dec],
            color=["tab:orange" if r.get("tool") == "llama.cpp" else "tab:blue" for r in dec])
    ax.set_yticks(range(len(dec)), [r["variant"] for r in dec], fontsize=8)
    ax.set_xlabel("tokens/s (greedy decoding)")
    ax.set_title(f"decoding ({header['date']}, {header['cpu']})", fontsize=9)
    fig.tight_layout()
    fig.savefig(folder / "decode.png", dpi=110)
    plt.close(fig)

    ker = [r for r in rows if r["bench"] == "kernels" and r.get("int4_vs_fp32")]
    fig, ax = plt.subplots(figsize=(8, 5))
    for shape in sorted({r["shape"] for r in ker}):
        pts = sorted((r["batch"], r["int4_vs_fp32"]) for r in ker if r["shape"] == shape)
        ax.plot(*zip(*pts), marker="o", label=shape)
    ax.axhline(1.0, color="grey", ls="--", lw=1)
    ax.set_xscale("log")
    ax.set_xlabel("batch (rows)")
    ax.set_ylabel("int4 layer speed / fp32 matmul")
    ax.set_title(f"int4 kernels against fp32 ({header['date']}, {header['cpu']})", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(folder / "kernels.png", dpi=110)
    plt.close(fig)


def kind(header: dict[str, Any]) -> str:
    return "speed" if header["suite"] == "speed" else "quality"


def write_report(folder: Path) -> None:
    """results.md and the plots of the run in ``folder``."""
    header, rows = _load(folder)
    if kind(header) == "speed":
        md = speed_markdown(header, rows)
        speed_plots(folder, header, rows)
    else:
        md = quality_markdown(header, rows)
        quality_plots(folder, header, rows)
    (folder / "results.md").write_text(md)


def update_docs(folder: Path, docs: Path) -> None:
    """Put the run's tables and plots into docs/results.md, between this suite's markers (a section
    appended at the end when they are missing); the plots and results.json go to docs/dashboard/."""
    header, _ = _load(folder)
    if not header.get("complete"):
        raise SystemExit(f"{folder} is an incomplete run: rerun the suite to finish it before --update-docs")
    suite = header["suite"]
    target = docs / "dashboard"
    target.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(folder / "results.json", target / f"{suite}.json")
    images = []
    for name in PLOTS[kind(header)]:
        shutil.copyfile(folder / name, target / f"{suite}-{name}")
        images.append(f"![{suite} {name[:-4].replace('_', ' ')}](dashboard/{suite}-{name})")
    body = (f"<!-- dashboard:{suite} (generated by bench/dashboard.py --update-docs; do not edit by hand) -->\n"
            + (folder / "results.md").read_text() + "\n" + "\n".join(images) + "\n"
            + f"\nRaw rows: [dashboard/{suite}.json](dashboard/{suite}.json).\n<!-- /dashboard:{suite} -->")
    path = docs / "results.md"
    text = path.read_text()
    start, end = text.find(f"<!-- dashboard:{suite} "), text.find(f"<!-- /dashboard:{suite} -->")
    if start >= 0 and end > start:
        text = text[:start] + body + text[end + len(f"<!-- /dashboard:{suite} -->"):]
    else:
        text = text.rstrip("\n") + f"\n\n## Dashboard: suite `{suite}`\n\n" + body + "\n"
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text(text)
    tmp.replace(path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folder", type=Path)
    ap.add_argument("--update-docs", action="store_true")
    args = ap.parse_args()
    write_report(args.folder)
    print((args.folder / "results.md").read_text())
    if args.update_docs:
        update_docs(args.folder, Path(__file__).resolve().parents[1] / "docs")


if __name__ == "__main__":
    main()
