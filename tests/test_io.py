"""qcore.save / qcore.load: exact round trips, atomic writes, and a clear error for every bad input."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import qcore
from qcore import checkpoint
from qcore.checkpoint import saving, skeleton
from qcore.plugin.errors import CheckpointError
from qcore.testing import STORIES_DIR, requires_shared
from qcore.tiny import tiny_inputs, tiny_model

GROUP = 32


def quantized(family: str = "llama", bits: int = 4, **overrides):
    model = tiny_model(family, **overrides)
    qcore.quantize(model, "rtn", bits=bits, group_size=GROUP, check=False)
    return model


def logits(model, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x).logits


@pytest.fixture(scope="module")
def llama_ckpt(tmp_path_factory):
    """A saved 4-bit tiny llama (tied embeddings) and its in-memory logits."""
    model = quantized("llama", tie_word_embeddings=True)
    x = tiny_inputs(model)
    ref = logits(model, x)
    path = checkpoint.save(model, tmp_path_factory.mktemp("ck") / "llama-q4")
    return path, x, ref, model.qcore_record


def copy_ckpt(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


# -- pure helpers -------------------------------------------------------------------------------
def test_parse_size():
    assert checkpoint.parse_size("2GB") == 2 * 10**9
    assert checkpoint.parse_size("500MB") == 500 * 10**6
    assert checkpoint.parse_size("1GiB") == 2**30
    assert checkpoint.parse_size("1.5kb") == 1500
    assert checkpoint.parse_size(1234) == 1234
    for bad in ("lots", "-1GB", "2XB", 0):
        with pytest.raises(CheckpointError, match="max_shard_size"):
            checkpoint.parse_size(bad)


def test_plan_shards_keeps_order_and_limit():
    sizes = {"a": 40, "b": 40, "c": 40, "huge": 500, "d": 10}
    assert checkpoint.plan_shards(sizes, 100) == [["a", "b"], ["c"], ["huge"], ["d"]]
    assert checkpoint.plan_shards({}, 100) == [[]]


def test_dedupe_tied_drops_aliases_and_clones_overlapping_views():
    w = torch.randn(4, 6)
    fused = torch.randn(2, 4, 3)
    state = {"embed.weight": w, "lm_head.weight": w, "e0": fused[0], "e1": fused[1], "own": torch.ones(3)}
    out, tied = checkpoint.dedupe_tied(state)
    assert tied == {"lm_head.weight": "embed.weight"}
    assert set(out) == {"embed.weight", "e0", "e1", "own"}
    assert out["e0"].untyped_storage().data_ptr() != out["e1"].untyped_storage().data_ptr()
    assert torch.equal(out["e1"], fused[1])
    from safetensors.torch import save

    save(out)  # safetensors accepts the result (it refuses shared storage)


# -- round trips ----------------------------------------------------------------------------------
ROUND_TRIP = [
    ("llama", {"tie_word_embeddings": True}),
    ("gpt2", {}),
    ("qwen3_moe", {}),
    ("phi3", {}),
    ("opt", {}),
    ("bert", {}),
]


@pytest.mark.parametrize(("family", "overrides"), ROUND_TRIP, ids=[f for f, _ in ROUND_TRIP])
def test_round_trip_logits_exact(tmp_path, family, overrides):
    model = quantized(family, **overrides)
    x = tiny_inputs(model)
    ref = logits(model, x)  # runs the kernels first: saving must still write the packed format
    path = checkpoint.save(model, tmp_path / "ck")
    loaded = checkpoint.load(path)
    assert type(loaded) is type(model)
    assert torch.equal(logits(loaded, x), ref)
    # every quantized module came back quantized, with the same codes
    from qcore.quant.linear import QuantLinear

    q_orig = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    q_new = {n: m for n, m in loaded.named_modules() if isinstance(m, QuantLinear)}
    assert q_orig and set(q_orig) == set(q_new)
    name = sorted(q_orig)[0]
    assert torch.equal(q_orig[name].codes(), q_new[name].codes())
    assert not any(t.device.type == "meta" for t in loaded.state_dict().values())


def test_loaded_model_saves_again(tmp_path, llama_ckpt):
    path, x, ref, _ = llama_ckpt
    again = checkpoint.save(checkpoint.load(path), tmp_path / "again")
    assert torch.equal(logits(checkpoint.load(again), x), ref)


def test_sharded_round_trip(tmp_path):
    model = quantized("llama", tie_word_embeddings=True)
    x = tiny_inputs(model)
    path = checkpoint.save(model, tmp_path / "sharded", max_shard_size="16KB")
    index = json.loads((path / checkpoint.INDEX_FILE).read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and all((path / s).is_file() for s in shards)
    assert not (path / checkpoint.SINGLE_FILE).exists()
    for s in shards:  # no shard over the limit unless it is one tensor
        from safetensors import safe_open

        with safe_open(str(path / s), framework="pt") as f:
            keys = list(f.keys())
        assert len(keys) == 1 or (path / s).stat().st_size <= 16_000 + 2_000  # + header
    assert torch.equal(logits(checkpoint.load(path), x), logits(model, x))


def test_tied_weights_stored_once_and_retied(llama_ckpt):
    path, x, ref, _ = llama_ckpt
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["quantization_config"]["checkpoint"]["tied"] == {"lm_head.weight": "model.embed_tokens.weight"}
    from safetensors import safe_open

    with safe_open(str(path / checkpoint.SINGLE_FILE), framework="pt") as f:
        assert "lm_head.weight" not in f.keys()
    model = checkpoint.load(path)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert torch.equal(logits(model, x), ref)


def test_config_carries_the_record(llama_ckpt):
    path, _, _, record = llama_ckpt
    qc = json.loads((path / "config.json").read_text())["quantization_config"]
    assert qc["format"] == "qcore" and qc["format_version"] == 1  # QuantLinear only: every qcore reads it
    assert qc["quant_method"] == "qcore"
    assert qc["qcore_version"] == qcore.__version__
    methods = [c["method"] for c in qc["chain"]]
    assert methods == ["rtn"]  # one entry per method run
    entry = qc["chain"][0]
    assert entry["config"]["bits"] == 4 and entry["config"]["group_size"] == GROUP
    assert entry["version"] and "plugin" in entry
    assert "model.layers.0.self_attn.q_proj" in qc["modules"]
    assert qc["modules"]["model.layers.0.self_attn.q_proj"]["bits"] == 4
    assert "lm_head" not in qc["modules"]
    files = qc["checkpoint"]["files"]
    assert files[checkpoint.SINGLE_FILE]["bytes"] == (path / checkpoint.SINGLE_FILE).stat().st_size
    loaded = checkpoint.load(path)
    assert loaded.qcore_record["chain"] == record["chain"]
    assert loaded.qcore_record["modules"] == qc["modules"]
    assert "checkpoint" not in loaded.qcore_record


def test_load_never_materializes_float_weights():
    """A 7B-sized config builds in an instant with every parameter on meta."""
    cfg = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 4096,
           "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32,
           "num_key_value_heads": 32, "vocab_size": 32000, "max_position_embeddings": 512}
    model = skeleton.build_empty(cfg, Path("."), None)
    params = list(model.parameters())
    assert sum(p.numel() for p in params) > 6e9
    assert all(p.device.type == "meta" for p in params)
    # buffers are real: the rotary frequencies are computed, not left empty
    inv = model.model.rotary_emb.inv_freq
    assert inv.device.type == "cpu" and torch.isfinite(inv).all() and inv[0] == 1.0


def test_overwrite_replaces_and_leaves_nothing_behind(tmp_path):
    a = quantized("llama", bits=4)
    b = quantized("qwen3", bits=8)
    x = tiny_inputs(a)
    target = tmp_path / "ck"
    checkpoint.save(a, target)
    with pytest.raises(CheckpointError, match="overwrite=True"):
        checkpoint.save(b, target)
    assert torch.equal(logits(checkpoint.load(target), x), logits(a, x))
    checkpoint.save(b, target, overwrite=True)
    assert torch.equal(logits(checkpoint.load(target), x), logits(b, x))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]


def test_failure_mid_save_keeps_earlier_checkpoint(tmp_path, monkeypatch):
    earlier = quantized("llama", bits=4)
    x = tiny_inputs(earlier)
    target = tmp_path / "ck"
    checkpoint.save(earlier, target)
    before = {p.name: p.read_bytes() for p in target.iterdir()}

    real = saving._write_shard
    calls = []

    def failing(tensors, path):
        calls.append(path)
        if len(calls) == 2:
            raise OSError("disk full (injected)")
        real(tensors, path)

    monkeypatch.setattr(saving, "_write_shard", failing)
    newer = quantized("qwen3", bits=8)
    with pytest.raises(OSError, match="injected"):
        checkpoint.save(newer, target, max_shard_size="16KB", overwrite=True)
    assert len(calls) == 2 and calls[0].is_file() is False  # the temp dir is gone
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]  # no half-written dir
    monkeypatch.setattr(saving, "_write_shard", real)
    assert torch.equal(logits(checkpoint.load(target), x), logits(earlier, x))


def test_failure_on_first_save_leaves_no_dir(tmp_path, monkeypatch):
    def failing(tensors, path):
        raise OSError("injected")

    monkeypatch.setattr(saving, "_write_shard", failing)
    with pytest.raises(OSError):
        checkpoint.save(quantized("llama"), tmp_path / "new")
    assert list(tmp_path.iterdir()) == []


def test_refuses_to_replace_a_directory_that_is_not_a_checkpoint(tmp_path):
    target = tmp_path / "home"
    (target / "projects").mkdir(parents=True)
    (target / "notes.txt").write_text("keep me")
    for overwrite in (False, True):
        with pytest.raises(CheckpointError, match="not written by qcore"):
            checkpoint.save(quantized("llama"), target, overwrite=overwrite)
    assert (target / "notes.txt").read_text() == "keep me"


def test_save_refuses_a_float_model(tmp_path):
    with pytest.raises(CheckpointError, match="qcore.quantize"):
        checkpoint.save(tiny_model("llama"), tmp_path / "x")


def test_save_refuses_a_record_that_is_not_json(tmp_path):
    model = quantized("llama")
    model.qcore_record["calibration"] = {"ids": torch.ones(2)}
    with pytest.raises(CheckpointError, match="JSON"):
        checkpoint.save(model, tmp_path / "x")
    assert list(tmp_path.iterdir()) == []


def test_tokenizer_saved_and_loaded(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2} | {f"w{i}": i for i in range(3, 128)}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, pad_token="<pad>", bos_token="<s>", eos_token="</s>")
    model = quantized("llama")
    path = checkpoint.save(model, tmp_path / "ck", tokenizer=tok)
    loaded, tok2 = checkpoint.load(path, with_tokenizer=True)
    assert tok2("w5 w7 w9").input_ids == [5, 7, 9]
    assert checkpoint.load_tokenizer(path)("w3").input_ids == [3]
    with pytest.raises(CheckpointError, match="no tokenizer"):
        checkpoint.load_tokenizer(checkpoint.save(model, tmp_path / "bare"))


def test_dtype_casts_float_parameters_only(llama_ckpt):
    path, *_ = llama_ckpt
    from qcore.quant.linear import QuantLinear

    model = checkpoint.load(path, dtype=torch.bfloat16)
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16
    q = model.model.layers[0].self_attn.q_proj
    assert isinstance(q, QuantLinear) and q.qweight.dtype == torch.int32


# -- bad inputs -----------------------------------------------------------------------------------
def test_pickle_checkpoint_refused_without_unpickling(tmp_path, monkeypatch):
    def no_torch_load(*a, **k):
        raise AssertionError("torch.load must never be called")

    monkeypatch.setattr(torch, "load", no_torch_load)
    d = tmp_path / "pickled"
    d.mkdir()
    tiny_model("llama").config.save_pretrained(d)
    (d / "pytorch_model.bin").write_bytes(b"\x80\x04\x95 not really a pickle")
    with pytest.raises(CheckpointError, match="only loads safetensors") as err:
        checkpoint.load(d)
    assert "pytorch_model.bin" in str(err.value) and "save_pretrained" in str(err.value)


def test_truncated_safetensors(tmp_path, llama_ckpt):
    path = copy_ckpt(llama_ckpt[0], tmp_path / "ck")
    f = path / checkpoint.SINGLE_FILE
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated") as err:
        checkpoint.load(path)
    assert checkpoint.SINGLE_FILE in str(err.value) and "re-save" in str(err.value)


def test_truncated_safetensors_without_save_record(tmp_path, llama_ckpt):
    """Even without the recorded sizes (e.g. edited config), the bad file is named."""
    path = copy_ckpt(llama_ckpt[0], tmp_path / "ck")
    cfg = json.loads((path / "config.json").read_text())
    del cfg["quantization_config"]["checkpoint"]["files"]
    (path / "config.json").write_text(json.dumps(cfg))
    f = path / checkpoint.SINGLE_FILE
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="truncated or corrupt") as err:
        checkpoint.load(path)
    assert str(f) in str(err.value)


def test_corrupt_tensor_bytes_fail_the_checksum(tmp_path, llama_ckpt):
    path = copy_ckpt(llama_ckpt[0], tmp_path / "ck")
    f = path / checkpoint.SINGLE_FILE
    data = bytearray(f.read_bytes())
    data[-10] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="sha256"):
        checkpoint.load(path)
    checkpoint.load(path, verify=False)  # the header is intact: loads when asked not to verify


@pytest.mark.parametrize("name", ["config.json", checkpoint.INDEX_FILE])
def test_corrupt_json(tmp_path, name):
    model = quantized("llama")
    path = checkpoint.save(model, tmp_path / "ck", max_shard_size="16KB")
    text = (path / name).read_text()
    (path / name).write_text(text[: len(text) // 2])
    with pytest.raises(CheckpointError, match="not valid JSON") as err:
        checkpoint.load(path)
    assert name in str(err.value)


def test_foreign_float_hf_checkpoint(tmp_path):
    d = tmp_path / "float"
    tiny_model("llama").save_pretrained(d)
    with pytest.raises(CheckpointError, match="float Hugging Face checkpoint") as err:
        checkpoint.load(d)
    assert "qcore.quantize" in str(err.value)


def test_foreign_gptq_checkpoint(tmp_path, llama_ckpt):
    path = copy_ckpt(llama_ckpt[0], tmp_path / "gptq")
    cfg = json.loads((path / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": False}
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="not the GPTQ layout") as err:  # qcore's tensors under a GPTQ config
        checkpoint.load(path)
    assert "quant_method 'gptq'" in str(err.value)


def test_newer_format_version(tmp_path, llama_ckpt):
    path = copy_ckpt(llama_ckpt[0], tmp_path / "new")
    cfg = json.loads((path / "config.json").read_text())
    cfg["quantization_config"]["format_version"] = checkpoint.FORMAT_VERSION + 1
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="upgrade qcore"):
        checkpoint.load(path)


def test_missing_shard(tmp_path):
    path = checkpoint.save(quantized("llama"), tmp_path / "ck", max_shard_size="16KB")
    shard = sorted(set(json.loads((path / checkpoint.INDEX_FILE).read_text())["weight_map"].values()))[1]
    (path / shard).unlink()
    with pytest.raises(CheckpointError, match="missing shard") as err:
        checkpoint.load(path)
    assert shard in str(err.value)


def test_missing_tensor(tmp_path, llama_ckpt):
    from safetensors.torch import load_file, save_file

    path = copy_ckpt(llama_ckpt[0], tmp_path / "ck")
    state = load_file(str(path / checkpoint.SINGLE_FILE))
    del state["model.layers.1.mlp.down_proj.scales"]
    save_file(state, str(path / checkpoint.SINGLE_FILE))
    cfg = json.loads((path / "config.json").read_text())
    cfg["quantization_config"]["checkpoint"]["files"] = {}
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="down_proj.scales"):
        checkpoint.load(path)


def test_record_naming_a_module_the_config_lacks(tmp_path, llama_ckpt):
    path = copy_ckpt(llama_ckpt[0], tmp_path / "ck")
    cfg = json.loads((path / "config.json").read_text())
    cfg["num_hidden_layers"] = 1  # layer 1's quantized modules no longer exist
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="model.layers.1.* does not exist"):
        checkpoint.load(path)


def test_missing_config_and_missing_dir(tmp_path, llama_ckpt):
    path = copy_ckpt(llama_ckpt[0], tmp_path / "ck")
    (path / "config.json").unlink()
    with pytest.raises(CheckpointError, match="no config.json"):
        checkpoint.load(path)
    with pytest.raises(CheckpointError, match="does not exist"):
        checkpoint.load(tmp_path / "nowhere")


def test_interrupted_save_points_at_the_earlier_checkpoint(tmp_path, llama_ckpt):
    copy_ckpt(llama_ckpt[0], tmp_path / ".ck.qcore-old-1234abcd")
    with pytest.raises(CheckpointError, match="rename it back"):
        checkpoint.load(tmp_path / "ck")


# -- describe / qcore info ------------------------------------------------------------------------
def test_describe_dir_matches_model_and_formats(llama_ckpt):
    path, *_ = llama_ckpt
    on_disk = checkpoint.describe_checkpoint(path)
    model = checkpoint.load(path)
    in_memory = checkpoint.describe_checkpoint(model)
    assert on_disk["quantized_fp16_bytes"] == in_memory["quantized_fp16_bytes"]
    q = [r for r in on_disk["layers"] if r["kind"] == "quantized"]
    assert len(q) == 2 * 7 and all(r["bits"] == 4 and r["group_size"] == GROUP for r in q)
    row = next(r for r in q if r["name"] == "model.layers.0.mlp.down_proj")
    out_f, in_f = row["shape"]
    n_groups = in_f // GROUP
    assert row["bytes"] == out_f * in_f // 2 + 2 * out_f * n_groups * 2  # int4 codes + fp16 scales/zeros
    assert row["fp16_bytes"] == 2 * out_f * in_f
    # tied lm_head counted once: total equals the bytes of the tensors in the file
    from safetensors import safe_open

    with safe_open(str(path / checkpoint.SINGLE_FILE), framework="pt") as f:
        file_bytes = sum(f.get_tensor(k).nbytes for k in f.keys())
    assert on_disk["total_bytes"] == file_bytes
    text = checkpoint.format_info(on_disk)
    assert "model.layers.0.mlp.down_proj" in text and "rtn(" in text
    assert "total:" in text and "fp16" in text


# -- real weights ---------------------------------------------------------------------------------
@requires_shared
@pytest.mark.shared
def test_stories260k_round_trip_with_tokenizer(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(STORIES_DIR, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(STORIES_DIR)
    qcore.quantize(model, "rtn", bits=4, group_size=-1, check=False)  # intermediate 172: per channel
    x = tok("Once upon a time, there was a little girl", return_tensors="pt").input_ids
    path = checkpoint.save(model, tmp_path / "stories-q4", tokenizer=tok)
    loaded, tok2 = checkpoint.load(path, with_tokenizer=True)
    assert tok2.decode(x[0]) == tok.decode(x[0])
    assert torch.equal(logits(loaded, x), logits(model, x))
    with torch.no_grad():
        a = model.generate(x, max_new_tokens=20, do_sample=False)
        b = loaded.generate(x, max_new_tokens=20, do_sample=False)
    assert torch.equal(a, b)
