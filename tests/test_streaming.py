"""Streamed quantization (qcore.pipeline.stream): a model read block by block from its safetensors
files gives a checkpoint equal, byte for byte, to the in-memory run's; at most one block is loaded."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

import qcore
from qcore.checkpoint.streaming import TensorSpec, iter_dtype_names, write_safetensors
from qcore.models import load_model
from qcore.pipeline import stream
from qcore.plugin.errors import CompatibilityError, ConfigError
from qcore.tiny import tiny_model

OPTS: dict[str, Any] = {"bits": 4, "group_size": 32}


def calib_ids(n: int = 4, seq: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 128, (n, seq), generator=torch.Generator().manual_seed(seed))


def make_src(folder: Path, layers: int = 3, **overrides: Any) -> Path:
    """A tiny Llama saved as a bf16 safetensors folder (the dtype big checkpoints ship in)."""
    model = tiny_model("llama", num_hidden_layers=layers, **overrides).to(torch.bfloat16)
    model.save_pretrained(folder, safe_serialization=True)
    return folder


def without_timings(obj: Any) -> Any:
    """A config with every measured duration (keys naming seconds) left out."""
    if isinstance(obj, dict):
        return {k: without_timings(v) for k, v in obj.items() if "seconds" not in k and not k.endswith("_s")}
    if isinstance(obj, list):
        return [without_timings(v) for v in obj]
    return obj


def weight_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.name.startswith("model")}


def assert_same_checkpoint(a: Path, b: Path) -> None:
    wa, wb = weight_bytes(a), weight_bytes(b)
    assert wa.keys() == wb.keys() and wa, (sorted(wa), sorted(wb))
    for name in wa:
        assert wa[name] == wb[name], f"{name} differs"
    ca = json.loads((a / "config.json").read_text())
    cb = json.loads((b / "config.json").read_text())
    assert without_timings(ca) == without_timings(cb)


def in_memory(src: Path, out: Path, method: Any, ids: torch.Tensor, **save: Any) -> Path:
    model, _ = load_model(str(src))
    qcore.quantize(model, method, calibration=ids, **OPTS)
    return qcore.save(model, out, **save)


@pytest.mark.parametrize("method", ["gptq", "awq", "rtn", ["awq", "gptq"]], ids=str)
def test_streamed_checkpoint_is_bit_identical_to_the_in_memory_one(tmp_path: Path, method: Any) -> None:
    src = make_src(tmp_path / "src")
    ids = calib_ids()
    ref = in_memory(src, tmp_path / "mem", method, ids)
    out = qcore.quantize(str(src), method, calibration=ids, out=tmp_path / "streamed", **OPTS)
    assert out == (tmp_path / "streamed").absolute()
    assert_same_checkpoint(ref, out)
    assert not list(tmp_path.glob(".streamed.qcore-*")), "the state folder is removed once the checkpoint is in place"
    reloaded = qcore.load(out)
    x = calib_ids(2, 16, seed=1)
    with torch.no_grad():
        assert torch.equal(reloaded(x).logits, qcore.load(ref)(x).logits)


def test_sharded_output_and_tied_embeddings_match_save(tmp_path: Path) -> None:
    src = make_src(tmp_path / "src", layers=4, tie_word_embeddings=True)
    ids = calib_ids()
    ref = in_memory(src, tmp_path / "mem", "gptq", ids, max_shard_size="60KB")
    out = stream.quantize_streaming(src, "gptq", calibration=ids, out=tmp_path / "streamed",
                                    max_shard_size="60KB", **OPTS)
    assert len([p for p in out.iterdir() if p.suffix == ".safetensors"]) > 1
    assert (out / "model.safetensors.index.json").read_bytes() == (ref / "model.safetensors.index.json").read_bytes()
    assert_same_checkpoint(ref, out)
    tied = json.loads((out / "config.json").read_text())["quantization_config"]["checkpoint"]["tied"]
    assert tied == {"lm_head.weight": "model.embed_tokens.weight"}


def resident(block: torch.nn.Module) -> bool:
    """Whether ``block`` holds memory: a float parameter, or a packed layer's buffers or kernel pack."""
    from qcore.quant import QuantLinear

    return (any(p.device.type != "meta" for p in block.parameters())
            or any(m.resident_bytes() > 0 for m in block.modules() if isinstance(m, QuantLinear)))


def test_one_block_at_a_time_and_the_head_is_read_only_at_the_end(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    src = make_src(tmp_path / "src", layers=4)
    seen: list[tuple[int, int, bool]] = []
    load = stream.StreamedRun.load_block

    def spy(self: stream.StreamedRun, index: int, binfo: Any) -> None:
        load(self, index, binfo)
        layers = self.model.model.layers
        loaded = [i for i, blk in enumerate(layers) if resident(blk)]
        on_meta = lambda m: all(p.device.type == "meta" for p in m.parameters())  # noqa: E731
        seen.append((index, len(loaded), on_meta(self.model.lm_head) and on_meta(self.model.model.embed_tokens)))

    monkeypatch.setattr(stream.StreamedRun, "load_block", spy)
    qcore.quantize(str(src), "gptq", calibration=calib_ids(), out=tmp_path / "out", **OPTS)
    assert seen == [(i, 1, True) for i in range(4)]


def test_stream_writer_lays_out_files_as_safetensors_does(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(0)
    tensors = {f"m.{j}.t{i}": (torch.randn(3, i + 1, generator=gen) * 10).to(dt)
               for i, (dt, _) in enumerate(iter_dtype_names()) for j in range(2)}
    tensors["scalar"] = torch.tensor(3.0)
    tensors["empty"] = torch.zeros(0, 4)
    save_file(tensors, str(tmp_path / "a.safetensors"), metadata={"format": "pt"})
    specs = [TensorSpec(k, v.dtype, tuple(v.shape), lambda v=v: v) for k, v in tensors.items()]
    write_safetensors(tmp_path / "b.safetensors", specs, {"format": "pt"})
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()


def test_methods_that_need_the_whole_model_are_refused(tmp_path: Path) -> None:
    src = make_src(tmp_path / "src")
    if "quarot" in qcore.list_methods():
        with pytest.raises(CompatibilityError, match="whole model in prepare"):
            qcore.quantize(str(src), "quarot", calibration=calib_ids(), out=tmp_path / "out")
    with pytest.raises(ConfigError, match="budget"):
        qcore.quantize(str(src), "gptq", calibration=calib_ids(), out=tmp_path / "out", budget_bits=3.5)
    with pytest.raises(ConfigError, match="out="):
        qcore.quantize(str(src), "rtn")
    assert not (tmp_path / "out").exists()


def test_cli_stream(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from qcore.cli import main

    src = make_src(tmp_path / "src")
    assert main(["quantize", str(src), "--stream", "--out", str(tmp_path / "out"), "-m", "rtn", "--bits", "4",
                 "--group-size", "32"]) == 0
    assert "streamed" in capsys.readouterr().out
    model, _ = load_model(str(src))
    qcore.quantize(model, "rtn", **OPTS)
    x = calib_ids(2, 16, seed=1)
    with torch.no_grad():
        assert torch.equal(qcore.load(tmp_path / "out")(x).logits, model(x).logits)
