"""qcore-quant-qlora: conformance, every tiny architecture, adapters in peft format, merge, fine-tune + resume."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

import qcore
from qcore.plugin.errors import CheckpointError, ConfigError
from qcore.testing import SHARED, STORIES_DIR, MethodConformance, requires_shared
from qcore.tiny import ENCODER_FAMILIES, TINY_FAMILIES, tiny_model

SHAKESPEARE = SHARED / "data" / "tinyshakespeare.txt"
CAUSAL_FAMILIES = [f for f in TINY_FAMILIES if f not in ENCODER_FAMILIES]


class TestQLoRAConformance(MethodConformance):
    method = "qlora"
    plugin_module = "qcore_qlora.plugin"
    tiny_options = {"r": 4, "alpha": 8}
    unsupported = [({"quant_type": "int4"}, "quant_type"), ({"r": 0}, "r"),
                   ({"compute_dtype": "int8"}, "compute_dtype"), ({"targets": ["no_such_proj"]}, "targets")]
    rtn_options = {"bits": 4, "group_size": 64}  # NF4 in blocks of 64
    from_pretrained = False  # bitsandbytes layers load their tensors through their serializer

    def is_packed(self, module: nn.Module) -> bool:
        """A bitsandbytes 4-bit linear, bare or under its LoRA adapter."""
        bnb = _bnb()
        return isinstance(getattr(module, "base_layer", module), bnb.nn.Linear4bit)


# -- helpers -------------------------------------------------------------------------------------
def _bnb() -> object:
    import bitsandbytes as bnb

    return bnb


def _lora_modules(model: nn.Module) -> dict[str, nn.Module]:
    from peft.tuners.lora import LoraLayer

    return {n: m for n, m in model.named_modules() if isinstance(m, LoraLayer)}


def _randomize_lora_b(model: nn.Module, seed: int = 0) -> None:
    """LoRA B starts at zero (adapter = no-op); make it non-trivial so tests can see it."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)


def _ids(vocab: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 16), generator=torch.Generator().manual_seed(seed))


# -- quantize: every architecture ------------------------------------------------------------------
@pytest.mark.parametrize("family", CAUSAL_FAMILIES)
def test_every_block_linear_becomes_nf4_with_an_adapter(family: str) -> None:
    from qcore.arch.introspect import inspect_model

    bnb = _bnb()
    model = tiny_model(family)
    info = inspect_model(model)
    expected = {f"{b.name}.{rel}" for b in info.blocks for rel, li in b.linears.items() if li.quantize}
    routers = {f"{b.name}.{rel}" for b in info.blocks for rel, li in b.linears.items() if not li.quantize}
    head = info.lm_head
    qcore.quantize(model, "qlora", r=4, alpha=8)

    lora = _lora_modules(model)
    assert set(lora) == expected
    for name, module in lora.items():
        base = module.get_base_layer()
        assert isinstance(base, bnb.nn.Linear4bit) and base.weight.quant_type == "nf4", name
    for name in routers:  # MoE routers stay float and untouched
        router = model.get_submodule(name)
        assert name not in lora and not isinstance(router, bnb.nn.Linear4bit)
        assert router.weight.dtype == torch.float32 and not router.weight.requires_grad
    if head is not None:
        assert type(model.get_submodule(head)) is nn.Linear
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert model.qcore_record["chain"][-1]["method"] == "qlora"

    ids = _ids(model.config.vocab_size)
    model.train()
    out = model(input_ids=ids, labels=ids)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    with_grad = [n for n, p in model.named_parameters() if p.grad is not None]
    assert with_grad and all("lora_" in n for n in with_grad)
    assert any(float(p.grad.abs().sum()) > 0 for n, p in model.named_parameters() if "lora_B" in n and p.grad is not None)


@pytest.mark.parametrize(("family", "targets", "suffixes"), [
    ("llama", ["q", "v"], ("self_attn.q_proj", "self_attn.v_proj")),
    ("qwen3", ["self_attn.o_proj", "down"], ("self_attn.o_proj", "mlp.down_proj")),
    ("gpt2", ["qkv"], ("attn.c_attn",)),
    ("qwen3_moe", ["up"], ("up_proj",)),
])
def test_targets_by_role_or_pattern(family: str, targets: list[str], suffixes: tuple[str, ...]) -> None:
    model = tiny_model(family)
    qcore.quantize(model, "qlora", r=4, targets=targets)
    names = list(_lora_modules(model))
    assert names and all(n.endswith(suffixes) for n in names)
    n_blocks = len(qcore.inspect_model(model).blocks)
    if family == "qwen3_moe":  # every expert's up_proj, no router
        assert len(names) == n_blocks * model.config.num_experts
    else:
        assert len(names) == n_blocks * len(suffixes)


def test_unknown_target_names_the_valid_roles() -> None:
    model = tiny_model("llama")
    with pytest.raises(ConfigError, match=r"use roles \(.*down.*\)"):
        qcore.quantize(model, "qlora", targets=["attention"])


def test_fp4_no_double_quant_and_ignore() -> None:
    bnb = _bnb()
    model = tiny_model("llama")
    qcore.quantize(model, "qlora", quant_type="fp4", double_quant=False, ignore=["*.layers.1.*"])
    lora = _lora_modules(model)
    assert lora and all(".layers.0." in n for n in lora)
    base = next(iter(lora.values())).get_base_layer()
    assert base.weight.quant_type == "fp4" and not base.weight.compress_statistics
    assert type(model.model.layers[1].self_attn.q_proj) is nn.Linear  # ignored: stays float
    assert not isinstance(model.model.layers[1].mlp.down_proj, bnb.nn.Linear4bit)


# -- pure pieces ---------------------------------------------------------------------------------
def test_dequantize_matches_the_4bit_forward_and_merge_matches_peft() -> None:
    from qcore_qlora.merge import dequantize_linear4bit, merged_linear

    model = tiny_model("llama")
    w_float = model.model.layers[0].mlp.down_proj.weight.detach().clone()
    qcore.quantize(model, "qlora", r=4, alpha=8)
    _randomize_lora_b(model)
    module = model.model.layers[0].mlp.down_proj
    base = module.get_base_layer()
    w = dequantize_linear4bit(base)
    assert w.shape == w_float.shape
    rel = float((w - w_float).norm() / w_float.norm())
    assert 0 < rel < 0.15, rel  # NF4 is lossy but close
    x = torch.randn(3, base.in_features, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(base(x), x @ w.T, rtol=1e-5, atol=1e-5)
        merged = merged_linear(module)
        torch.testing.assert_close(merged.weight, w + module.get_delta_weight("default").float())
        module.eval()
        torch.testing.assert_close(merged(x), module(x), rtol=1e-5, atol=1e-5)


def test_optimizer_state_round_trips_through_safetensors(tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    from qcore_qlora.finetune import optimizer_state_from_safetensors, optimizer_state_to_safetensors

    def run(opt: torch.optim.Optimizer, p: nn.Parameter, n: int) -> None:
        for i in range(n):
            (p * torch.arange(1.0, 7.0).reshape(2, 3) * (i + 1)).square().sum().backward()
            opt.step()
            opt.zero_grad()

    p1 = nn.Parameter(torch.ones(2, 3))
    o1 = torch.optim.AdamW([p1], lr=0.1, weight_decay=0.01)
    run(o1, p1, 3)
    tensors, meta = optimizer_state_to_safetensors(o1.state_dict())
    save_file(tensors, str(tmp_path / "opt.safetensors"))
    (tmp_path / "opt.json").write_text(json.dumps(meta))
    p2 = nn.Parameter(p1.detach().clone())
    o2 = torch.optim.AdamW([p2], lr=0.5)
    o2.load_state_dict(optimizer_state_from_safetensors(load_file(str(tmp_path / "opt.safetensors")),
                                                        json.loads((tmp_path / "opt.json").read_text())))
    run(o1, p1, 2)
    run(o2, p2, 2)
    assert torch.equal(p1, p2)


def test_schedule_split_and_batches() -> None:
    from qcore_qlora.finetune import batch_starts, lr_factor, split_heldout

    f = [lr_factor(s, 100, 10) for s in range(100)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(f[10:], f[11:])) and f[-1] == pytest.approx(0.1, abs=1e-3)
    text = "\n\n".join(f"paragraph {i} " + "x" * 50 for i in range(200))
    train, held, cut = split_heldout(text, 0.1)
    assert text[cut:].lstrip("\n") == held and train == text[:cut] and text[cut:cut + 2] == "\n\n"
    assert 0.08 < len(held) / len(text) < 0.12
    a, b = batch_starts(1000, 64, 4, 0, 3), batch_starts(1000, 64, 4, 0, 3)
    assert torch.equal(a, b) and not torch.equal(a, batch_starts(1000, 64, 4, 0, 4))
    assert int(a.max()) <= 1000 - 64


# -- adapters in peft's format -------------------------------------------------------------------
@pytest.mark.parametrize("family", ["llama", "qwen3_moe"])
def test_adapter_save_load_gives_identical_logits(family: str, tmp_path: Path) -> None:
    from qcore_qlora.adapter import load_adapter, save_adapter

    torch.manual_seed(0)
    model = tiny_model(family)
    qcore.quantize(model, "qlora", r=4, alpha=8)
    _randomize_lora_b(model)
    model.eval()
    ids = _ids(model.config.vocab_size)
    with torch.no_grad():
        ref = model(ids).logits
    path = save_adapter(model, tmp_path / "adapter")
    assert sorted(p.name for p in path.iterdir()) == [".qcore-written.json", "adapter_config.json",
                                                       "adapter_model.safetensors"]
    assert json.loads((path / "adapter_config.json").read_text())["peft_type"] == "LORA"

    torch.manual_seed(123)  # a different LoRA init: loading must overwrite all of it
    fresh = tiny_model(family)
    qcore.quantize(fresh, "qlora", r=4, alpha=8)
    load_adapter(fresh, path)
    fresh.eval()
    with torch.no_grad():
        assert torch.equal(fresh(ids).logits, ref)


def test_adapter_loads_with_peft_itself(tmp_path: Path) -> None:
    from peft import PeftModel

    from qcore_qlora.adapter import save_adapter
    from qcore_qlora.config import QLoRAConfig
    from qcore_qlora.quantizer import quantize_base

    model = tiny_model("llama")
    qcore.quantize(model, "qlora", r=4, alpha=8)
    _randomize_lora_b(model)
    model.eval()
    ids = _ids(model.config.vocab_size)
    with torch.no_grad():
        ref = model(ids).logits
    save_adapter(model, tmp_path / "adapter")

    base = tiny_model("llama")
    quantize_base(base, QLoRAConfig())  # the same deterministic NF4 base, no adapter
    peft_model = PeftModel.from_pretrained(base, str(tmp_path / "adapter"))
    peft_model.eval()
    with torch.no_grad():
        assert torch.equal(peft_model(ids).logits, ref)


def test_load_adapter_refuses_a_mismatched_rank(tmp_path: Path) -> None:
    from qcore_qlora.adapter import load_adapter, save_adapter

    model = tiny_model("llama")
    qcore.quantize(model, "qlora", r=4)
    save_adapter(model, tmp_path / "a")
    other = tiny_model("llama")
    qcore.quantize(other, "qlora", r=8)
    with pytest.raises(CheckpointError, match="r=4"):
        load_adapter(other, tmp_path / "a")


# -- qcore.save / qcore.load ----------------------------------------------------------------------
def _lora_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


def _train_steps(model: nn.Module, steps: int, seed: int) -> None:
    """A few AdamW steps on the trainable (adapter) weights, on random tokens."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    torch.manual_seed(seed)  # LoRA dropout
    model.train()
    for step in range(steps):
        ids = _ids(model.config.vocab_size, seed=seed * 100 + step)
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()


@pytest.mark.parametrize(("family", "targets"), [("llama", None), ("qwen3_moe", None), ("qwen3", ["q", "down"])])
def test_checkpoint_round_trip_is_bit_exact(family: str, targets: list[str] | None, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    bnb = _bnb()
    torch.manual_seed(0)
    model = tiny_model(family)
    qcore.quantize(model, "qlora", r=4, alpha=8, **({"targets": targets} if targets else {}))
    _randomize_lora_b(model)
    model.eval()
    ids = _ids(model.config.vocab_size)
    with torch.no_grad():
        ref = model(ids).logits
    path = qcore.save(model, tmp_path / "ck")
    assert {p.suffix for p in path.iterdir() if p.is_file()} <= {".json", ".safetensors", ".md"}  # no pickle; .md: the model card
    modules = json.loads((path / "config.json").read_text())["quantization_config"]["modules"]
    four_bit = {n for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}  # bare or base_layer
    assert {n for n, e in modules.items() if e["type"] == "qlora.lora_linear4bit"} == set(_lora_modules(model))
    assert {n for n, e in modules.items() if e["type"] == "qlora.linear4bit"} == four_bit
    if targets:  # some linears are bare 4-bit layers, without an adapter
        assert any(not n.endswith(".base_layer") for n in four_bit)

    def no_pickle(*args: object, **kwargs: object) -> None:
        raise AssertionError("torch.load must never be called")

    monkeypatch.setattr(torch, "load", no_pickle)
    loaded = qcore.load(path)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, ref)
    assert set(_lora_modules(loaded)) == set(_lora_modules(model))
    for name in four_bit:
        old, new = model.get_submodule(name), loaded.get_submodule(name)
        assert type(new) is bnb.nn.Linear4bit and isinstance(new.weight, bnb.nn.Params4bit), name
        assert new.weight.quant_type == "nf4" and new.weight.quant_state.nested and not new.weight.requires_grad
        assert torch.equal(new.weight.data, old.weight.data) and torch.equal(new.weight.absmax, old.weight.absmax)
    # the adapters stay trainable, as after qcore.quantize
    assert ({n for n, p in loaded.named_parameters() if p.requires_grad and "lora_" in n}
            == {n for n, p in model.named_parameters() if p.requires_grad})
    again = qcore.load(qcore.save(loaded, tmp_path / "again"))
    with torch.no_grad():
        assert torch.equal(again(ids).logits, ref)


def test_round_trip_after_finetune_steps_then_training_goes_on_identically(tmp_path: Path) -> None:
    from qcore_qlora.adapter import adapter_state_dict
    from qcore_qlora.serialize import restore_peft_state

    torch.manual_seed(0)
    model = tiny_model("llama")
    qcore.quantize(model, "qlora", r=4, alpha=8)
    start = _lora_state(model)
    _train_steps(model, steps=3, seed=1)
    tuned = _lora_state(model)
    assert all(not torch.equal(start[n], tuned[n]) for n in start if "lora_B" in n)
    ids = _ids(model.config.vocab_size)
    with torch.no_grad():
        ref = model(ids).logits

    loaded = qcore.load(qcore.save(model, tmp_path / "ck"))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, ref)
    # the model-level peft state is no module's: restore_peft_state sets it (and freezes all but LoRA)
    restore_peft_state(loaded)
    assert loaded.is_loaded_in_4bit is True
    mine, theirs = loaded.peft_config["default"], model.peft_config["default"]
    assert (mine.r, mine.lora_alpha, mine.lora_dropout, set(mine.target_modules)) == (
        theirs.r, theirs.lora_alpha, theirs.lora_dropout, set(theirs.target_modules))
    assert ({n for n, p in loaded.named_parameters() if p.requires_grad}
            == {n for n, p in model.named_parameters() if p.requires_grad})
    a, b = adapter_state_dict(model), adapter_state_dict(loaded)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    _train_steps(model, steps=2, seed=2)
    _train_steps(loaded, steps=2, seed=2)
    after, after_loaded = _lora_state(model), _lora_state(loaded)
    assert after.keys() == after_loaded.keys() and all(torch.equal(after[n], after_loaded[n]) for n in after)
    assert any(not torch.equal(after[n], tuned[n]) for n in after)


# -- merge ---------------------------------------------------------------------------------------
def test_merge_gives_a_plain_float_model_and_leaves_the_original() -> None:
    from qcore_qlora.merge import merge_and_unload_to_float

    bnb = _bnb()
    model = tiny_model("qwen3")
    qcore.quantize(model, "qlora", r=4, alpha=8, targets=["q", "down"])  # others: bare Linear4bit
    _randomize_lora_b(model)
    model.eval()
    ids = _ids(model.config.vocab_size)
    with torch.no_grad():
        ref = model(ids).logits
    merged = merge_and_unload_to_float(model)
    assert not _lora_modules(merged)
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in merged.modules())
    assert not hasattr(merged, "peft_config") and getattr(merged, "qcore_record", None) is None
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, ref, rtol=1e-4, atol=1e-4)
        assert torch.equal(model(ids).logits, ref)  # original untouched
    assert _lora_modules(model)


# -- fine-tuning on real weights -------------------------------------------------------------------
def _stories_qlora(seed: int = 0, **options: object) -> tuple[nn.Module, object]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(str(STORIES_DIR), dtype=torch.float32)
    qcore.quantize(model, "qlora", **options)
    return model, AutoTokenizer.from_pretrained(str(STORIES_DIR))


_RESUME_RUN = dict(steps=6, lr=1e-3, batch_size=4, seq_len=64, save_every=2, heldout_fraction=0.0, seed=3)


def _adapter_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path / "adapter_model.safetensors"))


@requires_shared
def test_interrupted_run_resumes_to_the_same_adapter(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import qcore_qlora.finetune as ft

    model, tok = _stories_qlora()
    full = qcore.finetune(model, str(SHAKESPEARE), tokenizer=tok, output_dir=tmp_path / "full", **_RESUME_RUN)
    assert full.resumed_from == 0 and len(full.losses) == 6

    # Interrupt during step 5 (after the step-4 checkpoint), as a kill or Ctrl-C would.
    real_step, calls = ft._train_step, []

    def dying_step(*args: object, **kwargs: object) -> float:
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return real_step(*args, **kwargs)

    model, tok = _stories_qlora()
    monkeypatch.setattr(ft, "_train_step", dying_step)
    with pytest.raises(KeyboardInterrupt):
        qcore.finetune(model, str(SHAKESPEARE), tokenizer=tok, output_dir=tmp_path / "cut", **_RESUME_RUN)
    monkeypatch.setattr(ft, "_train_step", real_step)
    steps = sorted(p.name for p in (tmp_path / "cut" / "checkpoints").iterdir())
    assert steps == ["step-000002", "step-000004"]
    for f in (tmp_path / "cut").rglob("*"):  # no pickle anywhere: safetensors + JSON only
        assert f.is_dir() or f.suffix in (".json", ".safetensors"), f
    state = json.loads((tmp_path / "cut" / "checkpoints" / "step-000004" / "trainer_state.json").read_text())
    assert state["step"] == 4 and len(state["losses"]) == 4

    # A kill during a save leaves a temporary or incomplete directory: resume must skip it.
    (tmp_path / "cut" / "checkpoints" / ".step-000006.tmp").mkdir()
    (tmp_path / "cut" / "checkpoints" / "step-000005").mkdir()
    (tmp_path / "cut" / "checkpoints" / "step-000005" / "optimizer.safetensors").write_bytes(b"trunc")

    model, tok = _stories_qlora(seed=99)  # a fresh process would start from a fresh model
    resumed = qcore.finetune(model, str(SHAKESPEARE), tokenizer=tok, output_dir=tmp_path / "cut", **_RESUME_RUN)
    assert resumed.resumed_from == 4
    assert resumed.losses == full.losses
    a, b = _adapter_tensors(tmp_path / "full" / "adapter"), _adapter_tensors(tmp_path / "cut" / "adapter")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    with pytest.raises(CheckpointError, match="lr"):
        qcore.finetune(model, str(SHAKESPEARE), tokenizer=tok, output_dir=tmp_path / "cut",
                       **{**_RESUME_RUN, "lr": 5e-4})


@requires_shared
def test_finetune_lowers_heldout_perplexity_then_merge_and_rtn(tmp_path: Path) -> None:
    model, tok = _stories_qlora()
    result = qcore.finetune(model, str(SHAKESPEARE), tokenizer=tok, steps=12, lr=2e-3, batch_size=4, seq_len=128,
                            save_every=0, eval_max_tokens=4096, output_dir=tmp_path, then="rtn",
                            then_options={"bits": 4, "group_size": -1})
    assert result.base_perplexity is not None and result.final_perplexity is not None
    assert result.final_perplexity < 0.8 * result.base_perplexity, (result.base_perplexity, result.final_perplexity)
    # merged float model within 1% of the adapter model (held-out tinyshakespeare, 4096 tokens)
    assert abs(result.merged_perplexity / result.final_perplexity - 1) < 0.01
    assert result.then_perplexity is not None and result.then_perplexity < result.base_perplexity
    record = json.loads((tmp_path / "finetune.json").read_text())
    assert record["record"]["heldout_fraction"] == 0.1 and record["evals"][0]["step"] == 0

    loaded = qcore.load(result.then_path)
    assert loaded.qcore_record["chain"][-1]["method"] == "rtn"
    assert loaded.qcore_record["provenance"][0]["method"] == "qlora"
    ids = _ids(512)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, result.then_model(ids).logits)
