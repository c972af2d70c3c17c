#!/usr/bin/env python
"""Write the test fixtures of other tools' checkpoints (tests/fixtures/), from a tiny random model.

Run from the repository root with qcore's venv; each writer runs in its own venv (see
bench/requirements-peers.txt), as the benches run peers:

    .venv/bin/python tools/make_import_fixtures.py [--gptqmodel-python /work/peers/gptqmodel/bin/python]

1. here (qcore's venv): the tiny llama of ``qcore.tiny`` (seed 0) with a character tokenizer, and
   calibration / probe token ids, in a temporary folder;
2. in GPTQModel's venv: ``GPTQModel.quantize`` (GPTQ: 4-bit, group 32, asymmetric, act-order; AWQ:
   4-bit, group 32, GEMM layout, on a variant with 4 KV heads) in float16
   on the CPU, ``model.save``, ``GPTQModel.load`` of the saved folder, then the writer's own results
   from that model: its logits on the probe ids and the
   weights of two layers as its forward applies them (on the identity; exact in float16, the
   layers have no bias), saved beside the fixture as ``<fixture>.reference.safetensors``.

3. in llm-compressor's venv: ``GPTQModifier`` (4-bit, group 32, asymmetric), saved compressed
   (pack-quantized), and compressed-tensors' own decompression of it as the reference.

The fixture folder keeps what a user's checkpoint holds (config, weights, tokenizer) and drops the
writer's logs. Its size is printed; it must stay a few hundred KB.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"
GPTQ_FIXTURE = "gptqmodel-tiny-llama-w4g32"
AWQ_FIXTURE = "gptqmodel-awq-tiny-llama-w4g32"
CT_FIXTURE = "llmcompressor-tiny-llama-w4g32"
AWQ_OVERRIDES = {"num_key_value_heads": 4}
"""GPTQModel's AWQ search needs output widths that are multiples of 64 (k/v: 4 heads x 16)."""
PROBE_LAYERS = ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj")
KEEP_SUFFIXES = (".json", ".safetensors")
DROP = ("quant_log.csv",)


def writer_gptqmodel(cfg: dict) -> None:
    """GPTQModel's side (its venv): quantize (GPTQ, or AWQ with ``cfg["awq"]``), save, and record
    its own logits and dequantization from its reading of the saved folder."""
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
    import gptqmodel
    import torch
    from gptqmodel import GPTQModel, QuantizeConfig
    from safetensors.torch import load_file, save_file

    ids = load_file(cfg["ids"])
    kwargs = {}
    if cfg.get("awq"):
        from gptqmodel.quantization.config import FORMAT, METHOD
        from gptqmodel.utils.backend import BACKEND

        qc = QuantizeConfig(bits=4, group_size=32, sym=False, quant_method=METHOD.AWQ, format=FORMAT.GEMM,
                            offload_to_disk=False)
        kwargs = {"backend": BACKEND.AWQ_TORCH}
    else:
        qc = QuantizeConfig(bits=4, group_size=32, sym=False, desc_act=True)
    model = GPTQModel.load(cfg["float"], qc, device="cpu", dtype=torch.float16)
    model.quantize([{"input_ids": r.tolist(), "attention_mask": [1] * len(r)} for r in ids["calib"]], batch_size=1,
                   **kwargs)
    model.save(cfg["out"])
    del model  # the writer's reading of its own file is the reference, as a user gets it
    model = GPTQModel.load(cfg["out"], device="cpu", dtype=torch.float16, **kwargs)
    modules = dict(model.model.named_modules())
    with torch.no_grad():
        ref = {"logits": model.model(ids["probe"]).logits.float().contiguous(), "probe": ids["probe"]}
        for name in PROBE_LAYERS:  # the writer's own forward on the identity: its dequantized weight
            eye = torch.eye(modules[name].in_features, dtype=torch.float16)
            ref[f"{name}.weight"] = modules[name](eye).T.float().contiguous()
    save_file(ref, cfg["reference"], metadata={"gptqmodel": gptqmodel.__version__})


def writer_llmcompressor(cfg: dict) -> None:
    """llm-compressor's side (its venv): GPTQModifier (4-bit, group 32, asymmetric), saved
    compressed (pack-quantized); the reference is compressed-tensors' own decompression of the
    saved folder (transformers with ``run_compressed=False``): its logits and two layers' weights."""
    import llmcompressor
    import torch
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM
    from transformers.utils.quantization_config import CompressedTensorsConfig

    ids = load_file(cfg["ids"])
    model = AutoModelForCausalLM.from_pretrained(cfg["float"], dtype=torch.float32)
    calib = Dataset.from_dict({"input_ids": ids["calib"].tolist(), "attention_mask": torch.ones_like(ids["calib"]).tolist()})
    weights = {"num_bits": 4, "type": "int", "symmetric": False, "strategy": "group", "group_size": 32}
    oneshot(model=model, dataset=calib, recipe=GPTQModifier(config_groups={"g": {"targets": ["Linear"], "weights": weights}},
                                                            ignore=["lm_head"]),
            num_calibration_samples=int(ids["calib"].shape[0]), max_seq_length=int(ids["calib"].shape[1]), batch_size=1)
    model.save_pretrained(cfg["out"], save_compressed=True)
    ref_model = AutoModelForCausalLM.from_pretrained(cfg["out"], dtype=torch.float32,
                                                     quantization_config=CompressedTensorsConfig(run_compressed=False))
    modules = dict(ref_model.named_modules())
    with torch.no_grad():
        ref = {"logits": ref_model(ids["probe"]).logits.float().contiguous(), "probe": ids["probe"]}
        for name in PROBE_LAYERS:
            ref[f"{name}.weight"] = modules[name].weight.float().contiguous()
    save_file(ref, cfg["reference"], metadata={"llmcompressor": llmcompressor.__version__})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--writer", help=argparse.SUPPRESS)
    ap.add_argument("--config", help=argparse.SUPPRESS)
    ap.add_argument("--gptqmodel-python", default="/work/peers/gptqmodel/bin/python")
    ap.add_argument("--llmcompressor-python", default="/work/peers/llmc/bin/python")
    args = ap.parse_args()
    if args.writer:
        {"gptqmodel": writer_gptqmodel, "llmcompressor": writer_llmcompressor}[args.writer](json.loads(args.config))
        return

    import torch
    from safetensors.torch import save_file

    from qcore.testing import char_tokenizer
    from qcore.tiny import tiny_model

    work = Path(tempfile.mkdtemp(prefix="qcore_fixtures_"))
    gen = torch.Generator().manual_seed(0)
    save_file({"calib": torch.randint(3, 128, (8, 64), generator=gen),
               "probe": torch.randint(3, 128, (2, 16), generator=gen)}, str(work / "ids.safetensors"))
    FIXTURES.mkdir(parents=True, exist_ok=True)
    writers = ((GPTQ_FIXTURE, {}, False, "gptqmodel"), (AWQ_FIXTURE, AWQ_OVERRIDES, True, "gptqmodel"),
               (CT_FIXTURE, {}, False, "llmcompressor"))
    for name, overrides, awq, writer in writers:
        float_dir = work / f"float-{name}"
        tiny_model("llama", seed=0, **overrides).save_pretrained(float_dir, safe_serialization=True)
        char_tokenizer(float_dir)
        out = work / name
        cfg = {"float": str(float_dir), "ids": str(work / "ids.safetensors"), "out": str(out), "awq": awq,
               "reference": str(FIXTURES / f"{name}.reference.safetensors")}
        python = args.gptqmodel_python if writer == "gptqmodel" else args.llmcompressor_python
        subprocess.run([python, __file__, "--writer", writer, "--config", json.dumps(cfg)],
                       check=True, env={**os.environ, "PYTHONPATH": ""})
        target = FIXTURES / name
        shutil.rmtree(target, ignore_errors=True)
        target.mkdir(parents=True)
        for f in out.iterdir():
            if f.suffix in KEEP_SUFFIXES and f.name not in DROP:
                shutil.copy2(f, target / f.name)
        size = sum(f.stat().st_size for f in target.iterdir())
        print(f"{target.relative_to(ROOT)}: {len(list(target.iterdir()))} files, {size / 1024:.0f} KB", file=sys.stderr)


if __name__ == "__main__":
    main()
