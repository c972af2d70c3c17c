"""Architecture introspection on tiny models of every family (built from configs, no download)."""
from __future__ import annotations

import copy
import dataclasses
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from qcore.plugin.errors import ArchitectureError
from qcore.arch.fold import group_tie
from qcore.arch.introspect import ScaleGroup, fold_scales, inspect_model
from qcore.arch.surgery import UnfusedExperts, prepare_model
from qcore.testing import STORIES_DIR, requires_shared
from qcore.tiny import TINY_FAMILIES, tiny_inputs, tiny_model

torch.set_num_threads(1)

ATTN = [["q", "k", "v"], ["o"], ["gate", "up"], ["down"]]
LLAMA_GROUPS = {
    "attn_in": ("input_layernorm", True),
    "attn_out": ("self_attn.v_proj", True),  # GQA (4 heads / 2 kv heads): tied scales
    "mlp_in": ("post_attention_layernorm", True),
    "mlp_out": ("mlp.up_proj", True),
}
LLAMA = dict(path="model.layers", embed="model.embed_tokens", head="lm_head", final="model.norm",
             decoder=True, offset=0.0, stages=ATTN, groups=LLAMA_GROUPS)

EXPECTED: dict[str, dict] = {
    "llama": LLAMA,
    "qwen2": LLAMA,
    "qwen3": LLAMA,
    "mistral": LLAMA,
    "qwen3_moe": {**LLAMA, "stages": [["q", "k", "v"], ["o"], ["expert.gate", "expert.up"], ["expert.down"]],
                  "groups": {**LLAMA_GROUPS, "mlp_in": None,
                             "expert_in": ("post_attention_layernorm", True),
                             "mlp_out": None, "expert_out": ("mlp.experts.0.up_proj", True)}},
    "phi3": {**LLAMA, "stages": [["qkv"], ["o"], ["gate_up"], ["down"]],
             "groups": {"attn_in": ("input_layernorm", True), "attn_out": ("self_attn.qkv_proj", False),
                        "mlp_in": ("post_attention_layernorm", True), "mlp_out": ("mlp.gate_up_proj", False)}},
    "gemma2": {**LLAMA, "offset": 1.0,
               "groups": {**LLAMA_GROUPS, "mlp_in": ("pre_feedforward_layernorm", True)}},
    "gpt2": dict(path="transformer.h", embed="transformer.wte", head="lm_head", final="transformer.ln_f",
                 decoder=True, offset=0.0, stages=[["qkv"], ["o"], ["fc1"], ["fc2"]],
                 groups={"attn_in": ("ln_1", True), "attn_out": ("attn.c_attn", False),
                         "mlp_in": ("ln_2", True), "mlp_out": ("mlp.c_fc", False)}),
    "opt": dict(path="model.decoder.layers", embed="model.decoder.embed_tokens", head="lm_head",
                final="model.decoder.final_layer_norm", decoder=True, offset=0.0,
                stages=[["k", "v", "q"], ["o"], ["fc1"], ["fc2"]],
                groups={"attn_in": ("self_attn_layer_norm", True), "attn_out": ("self_attn.v_proj", True),
                        "mlp_in": ("final_layer_norm", True), "mlp_out": ("fc1", True)}),
    "bert": dict(path="bert.encoder.layer", embed="bert.embeddings.word_embeddings",
                 head="cls.predictions.decoder", final=None, decoder=False, offset=0.0,
                 stages=[["q", "k", "v"], ["o"], ["fc1"], ["fc2"]],
                 groups={"attn_in": (None, False), "attn_out": ("attention.self.value", True),
                         "mlp_in": ("attention.output.LayerNorm", False),
                         "mlp_out": ("intermediate.dense", False)}),
}


def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


@pytest.fixture(scope="module", params=TINY_FAMILIES)
def family(request: pytest.FixtureRequest) -> str:
    return request.param


def test_every_family_has_expectations() -> None:
    assert set(EXPECTED) == set(TINY_FAMILIES)


def test_structure(family: str) -> None:
    exp = EXPECTED[family]
    info = inspect_model(tiny_model(family))
    assert info.family == family
    assert info.blocks_path == exp["path"]
    assert len(info.blocks) == 2
    assert [b.name for b in info.blocks] == [f"{exp['path']}.0", f"{exp['path']}.1"]
    assert info.embed == exp["embed"]
    assert info.lm_head == exp["head"]
    assert info.final_norm == exp["final"]
    assert info.is_decoder is exp["decoder"]
    assert info.post_norm is (family == "bert")
    assert info.norm_offset == exp["offset"]
    for block in info.blocks:
        # true-sequential stages, by role (a stage lists every expert's linears of that role)
        stages = [sorted({block.linears[n].role for n in stage}) for stage in block.sequential]
        assert stages == [sorted(s) for s in exp["stages"]]
        # every quantizable linear is in exactly one stage
        flat = [n for stage in block.sequential for n in stage]
        assert sorted(flat) == sorted(block.quantizable())
        for name, li in block.linears.items():
            mod = block.module.get_submodule(name)
            assert (li.in_features, li.out_features) == tuple(mod.weight.shape[::-1])
        groups: dict[str, ScaleGroup] = {}
        for g in block.scale_groups:
            groups.setdefault(g.role, g)  # the first group of each role
        for role, want in exp["groups"].items():
            if want is None:
                assert role not in groups
                continue
            prev, scalable = want
            assert role in groups, f"{family}: no {role} group in {sorted(groups)}"
            assert groups[role].prev == prev, (role, groups[role])
            assert groups[role].scalable is scalable, (role, groups[role])
            assert scalable or groups[role].reason
        assert all(g.norm_offset == exp["offset"] for g in block.scale_groups if g.prev_kind == "norm")


def test_every_group_reads_prev_output(family: str) -> None:
    """Data flow check: a group's linears read exactly the output of its ``prev`` module."""
    model = tiny_model(family)
    info = inspect_model(model)
    block = info.blocks[1]
    seen: dict[str, torch.Tensor] = {}
    hooks = []
    for group in block.scale_groups:
        if group.prev is None:
            continue
        for name in [group.prev]:
            mod = block.module.get_submodule(name)
            hooks.append(mod.register_forward_hook(
                lambda m, i, o, name=name: seen.__setitem__("out:" + name, o.detach().reshape(-1, o.shape[-1]))))
        for name in group.linears:
            mod = block.module.get_submodule(name)
            hooks.append(mod.register_forward_hook(
                lambda m, i, o, name=name: seen.__setitem__("in:" + name, i[0].detach().reshape(-1, i[0].shape[-1]))))
    _logits(model, tiny_inputs(model))
    for h in hooks:
        h.remove()
    checked = 0
    for group in block.scale_groups:
        if group.prev is None:
            continue
        out = seen["out:" + group.prev]
        for name in group.linears:
            if "in:" + name not in seen:  # an expert that got no tokens
                continue
            inp = seen["in:" + name]
            if group.prev_kind == "linear" and out.shape[-1] != inp.shape[-1]:
                continue  # fused/GQA prev: shapes differ, not foldable (checked elsewhere)
            if inp.shape[0] != out.shape[0]:  # routed expert: a subset of the tokens
                assert any(torch.equal(inp[0], r) for r in out) or group.prev_kind == "linear"
                continue
            if group.prev_kind == "norm":
                torch.testing.assert_close(inp, out, rtol=0, atol=0)
            checked += 1
    assert checked > 0


def _perturb(model: nn.Module, seed: int = 1) -> None:
    """Random norm weights/biases, so a wrong fold cannot hide behind weight == 1."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if "Norm" in type(module).__name__ and isinstance(getattr(module, "weight", None), torch.Tensor):
                module.weight.copy_(0.5 + torch.rand(module.weight.shape, generator=gen))
                if getattr(module, "bias", None) is not None:
                    module.bias.copy_(0.1 * torch.randn(module.bias.shape, generator=gen))


def _scales(n: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return 0.5 + 1.5 * torch.rand(n, generator=gen)


def test_scalable_groups_fold_exactly(family: str) -> None:
    model = tiny_model(family)
    _perturb(model)
    ids = tiny_inputs(model)
    info = inspect_model(model)
    ref = _logits(model, ids)
    folded = 0
    for block in info.blocks:
        for i, group in enumerate(block.scale_groups):
            if group.scalable:
                width = block.linears[group.linears[0]].in_features
                fold_scales(block.module, group, group_tie(group, _scales(width, seed=100 + i)))
                folded += 1
    assert folded >= 2
    torch.testing.assert_close(_logits(model, ids), ref, rtol=1e-4, atol=1e-5)


def test_unscalable_groups_really_are_inexact(family: str) -> None:
    """Forcing a fold on a group marked unscalable (where shapes allow it) changes the output."""
    model = tiny_model(family)
    _perturb(model)
    ids = tiny_inputs(model)
    info = inspect_model(model)
    ref = _logits(model, ids)
    block = info.blocks[0]
    tried = 0
    for group in block.scale_groups:
        if group.scalable or group.prev is None:
            continue
        width = block.linears[group.linears[0]].in_features
        prev = block.module.get_submodule(group.prev)
        if group.prev_kind == "linear" and prev.weight.shape[0] != width:
            continue  # fused / GQA prev: no same-shape fold exists at all
        trial = copy.deepcopy(model)
        forced = dataclasses.replace(group, scalable=True)
        fold_scales(trial.get_submodule(block.name), forced, _scales(width, seed=7))
        assert not torch.allclose(_logits(trial, ids), ref, rtol=1e-3, atol=1e-4), group
        tried += 1
    if family in ("gpt2", "bert"):
        assert tried >= 1


def test_gemma_offset_matters() -> None:
    model = tiny_model("gemma2")
    _perturb(model)
    ids = tiny_inputs(model)
    info = inspect_model(model)
    ref = _logits(model, ids)
    group = info.blocks[0].group("attn_in")[0]
    # Folding with the wrong offset would change the output: the fold's numeric check refuses it
    # and leaves the model as it was.
    with pytest.raises(ArchitectureError, match="not exact"):
        fold_scales(info.blocks[0].module, dataclasses.replace(group, norm_offset=0.0), _scales(64, seed=3))
    torch.testing.assert_close(_logits(model, ids), ref, rtol=0, atol=0)
    fold_scales(info.blocks[0].module, group, _scales(64, seed=3))
    torch.testing.assert_close(_logits(model, ids), ref, rtol=1e-4, atol=1e-5)


def test_mha_makes_v_to_o_scalable() -> None:
    model = tiny_model("llama", num_key_value_heads=4)
    _perturb(model)
    ids = tiny_inputs(model)
    info = inspect_model(model)
    group = info.blocks[0].group("attn_out")[0]
    assert group.scalable and group.prev == "self_attn.v_proj" and group.linears == ["self_attn.o_proj"]
    ref = _logits(model, ids)
    fold_scales(info.blocks[0].module, group, _scales(64, seed=5))
    torch.testing.assert_close(_logits(model, ids), ref, rtol=1e-4, atol=1e-5)


def test_gqa_v_to_o_folds_exactly_with_tied_scales() -> None:
    from qcore.arch.fold import tie_channels

    model = tiny_model("llama")  # 4 query heads, 2 kv heads, head_dim 16
    _perturb(model)
    ids = tiny_inputs(model)
    info = inspect_model(model)
    group = info.blocks[0].group("attn_out")[0]
    assert group.scalable and (group.repeat, group.head_dim) == (2, 16)
    ref = _logits(model, ids)
    s = _scales(64, seed=6)
    with pytest.raises(ArchitectureError, match="share each kv head"):
        fold_scales(info.blocks[0].module, group, s)  # untied: refused, nothing changed
    torch.testing.assert_close(_logits(model, ids), ref, rtol=0, atol=0)
    tied = group_tie(group, s)
    runs = tied.reshape(2, 2, 16)
    assert torch.equal(runs[:, 0], runs[:, 1]) and not torch.equal(runs[0, 0], runs[1, 0])
    assert torch.equal(tie_channels(s, 1, 16), s)
    assert torch.equal(group_tie(group, s, "max").reshape(2, 2, 16)[:, 0], s.reshape(2, 2, 16).amax(1))
    fold_scales(info.blocks[0].module, group, tied)
    torch.testing.assert_close(_logits(model, ids), ref, rtol=1e-4, atol=1e-5)


def test_gqa_without_head_width_is_not_scalable() -> None:
    from qcore.arch.introspect import _gqa_repeat

    assert _gqa_repeat(32, 64, SimpleNamespace(head_dim=16)) == (2, 16)
    assert _gqa_repeat(32, 64, SimpleNamespace(hidden_size=64, num_attention_heads=4)) == (2, 16)
    assert _gqa_repeat(32, 64, SimpleNamespace()) == (0, 0)
    assert _gqa_repeat(32, 64, SimpleNamespace(head_dim=12)) == (0, 0)  # 32 v channels are not whole heads


def test_fold_refuses_unscalable() -> None:
    info = inspect_model(tiny_model("phi3"))
    group = info.blocks[0].group("attn_out")[0]
    with pytest.raises(ArchitectureError, match="cannot be folded exactly: v is fused"):
        fold_scales(info.blocks[0].module, group, torch.ones(64))


def test_prepare_model_is_exact_and_idempotent(family: str) -> None:
    model = tiny_model(family)
    ids = tiny_inputs(model)
    ref = _logits(model, ids)
    prepare_model(model)
    assert not any(type(m).__name__ == "Conv1D" for m in model.modules())
    assert not any(p.dim() == 3 for p in model.parameters())
    torch.testing.assert_close(_logits(model, ids), ref, rtol=1e-5, atol=1e-5)
    before = {n: id(m) for n, m in model.named_modules()}
    prepare_model(model)
    assert {n: id(m) for n, m in model.named_modules()} == before


def test_gpt2_conv1d_becomes_linear() -> None:
    model = tiny_model("gpt2")
    conv = model.transformer.h[0].attn.c_attn
    weight = conv.weight.detach().clone()
    prepare_model(model)
    lin = model.transformer.h[0].attn.c_attn
    assert isinstance(lin, nn.Linear) and (lin.in_features, lin.out_features) == (64, 192)
    assert torch.equal(lin.weight, weight.t())


def test_moe_experts_see_exactly_their_tokens() -> None:
    model = tiny_model("qwen3_moe")
    info = inspect_model(model)
    moe_block = info.blocks[0]
    assert moe_block.moe is not None
    assert moe_block.moe.router == "mlp.gate" and moe_block.moe.top_k == 2
    assert moe_block.moe.experts == [f"mlp.experts.{i}" for i in range(4)]
    experts = moe_block.module.mlp.experts
    assert isinstance(experts, UnfusedExperts)
    routed: dict[str, torch.Tensor] = {}
    seen: dict[int, torch.Tensor] = {}
    moe_block.module.mlp.register_forward_hook(
        lambda m, i, o: routed.__setitem__("x", i[0].detach().reshape(-1, i[0].shape[-1])))
    moe_block.module.mlp.gate.register_forward_hook(lambda m, i, o: routed.__setitem__("idx", o[2]))
    for e in range(4):
        experts[e].gate_proj.register_forward_hook(lambda m, i, o, e=e: seen.__setitem__(e, i[0].detach()))
        experts[e].up_proj.register_forward_hook(
            lambda m, i, o, e=e: torch.testing.assert_close(i[0], seen[e], rtol=0, atol=0))
    _logits(model, tiny_inputs(model, batch=2, seq_len=24))
    x, idx = routed["x"], routed["idx"]
    assert len(seen) >= 2  # the routing actually spreads tokens
    for e in range(4):
        tokens = torch.where((idx == e).t())[1]  # routed tokens, in (top-k slot, token) order
        if len(tokens) == 0:
            assert e not in seen
            continue
        assert len(set(tokens.tolist())) == len(tokens)
        torch.testing.assert_close(seen[e], x[tokens], rtol=0, atol=0)


def test_router_is_never_quantizable() -> None:
    info = inspect_model(tiny_model("qwen3_moe"))
    for block in info.blocks:
        router = block.linears["mlp.gate"]
        assert router.role == "router" and router.quantize is False
        assert (router.in_features, router.out_features) == (64, 4)
        assert "mlp.gate" not in block.quantizable()
        assert all("mlp.gate" not in stage for stage in block.sequential)
        # ...but a norm fold must rescale it too, so it is in the expert_in group
        assert "mlp.gate" in block.group("expert_in")[0].linears
        assert sum(li.expert is not None for li in block.linears.values()) == 12
    assert all(not n.endswith("mlp.gate") for n in info.quantizable())


def test_moe_dense_layers_mixed() -> None:
    info = inspect_model(tiny_model("qwen3_moe", mlp_only_layers=[1]))
    assert info.blocks[0].moe is not None and info.blocks[1].moe is None
    assert [g.role for g in info.blocks[1].scale_groups] == ["attn_in", "attn_out", "mlp_in", "mlp_out"]


def test_other_families_generic() -> None:
    """Families without a tiny preset still introspect (nothing per architecture)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    base = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=128, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    mixtral = AutoModelForCausalLM.from_config(AutoConfig.for_model(
        "mixtral", **base, num_local_experts=4, num_experts_per_tok=2)).eval()
    ids = torch.randint(3, 128, (2, 16))
    ref = _logits(mixtral, ids)
    info = inspect_model(mixtral)
    torch.testing.assert_close(_logits(mixtral, ids), ref, rtol=1e-5, atol=1e-5)
    assert info.blocks[0].moe is not None and len(info.blocks[0].moe.experts) == 4
    assert info.blocks[0].linears[info.blocks[0].moe.router].quantize is False

    qwen2_moe = AutoModelForCausalLM.from_config(AutoConfig.for_model(
        "qwen2_moe", **base, moe_intermediate_size=32, shared_expert_intermediate_size=64, num_experts=4,
        num_experts_per_tok=2)).eval()
    ref = _logits(qwen2_moe, ids)
    info = inspect_model(qwen2_moe)
    torch.testing.assert_close(_logits(qwen2_moe, ids), ref, rtol=1e-5, atol=1e-5)
    block = info.blocks[0]
    assert block.moe.shared == ["mlp.shared_expert"] and block.moe.shared_gate == "mlp.shared_expert_gate"
    assert block.linears["mlp.shared_expert_gate"].quantize is False
    assert block.linears["mlp.shared_expert.down_proj"].role == "down"
    outs = {g.linears[0]: g.prev for g in block.group("mlp_out")}
    assert outs == {"mlp.shared_expert.down_proj": "mlp.shared_expert.up_proj"}
    assert len(block.group("expert_out")) == 4


def test_custom_gate_experts_and_no_pre_norm() -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    base = dict(hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=128, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    # GPT-OSS: transposed, interleaved, biased experts with a clamped custom gate
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(
        "gpt_oss", **base, num_local_experts=4, num_experts_per_tok=2, head_dim=16,
        layer_types=["full_attention"] * 2)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.1)
    ids = torch.randint(3, 128, (2, 16))
    ref = _logits(model, ids)
    info = inspect_model(model)
    assert isinstance(model.model.layers[0].mlp.experts, UnfusedExperts)
    torch.testing.assert_close(_logits(model, ids), ref, rtol=1e-5, atol=1e-5)
    block = info.blocks[0]
    assert block.moe.router == "mlp.router" and block.linears["mlp.router"].quantize is False
    assert block.linears["mlp.experts.3.down_proj"].role == "expert.down"
    out = block.group("expert_out")
    assert len(out) == 4 and not any(g.scalable for g in out) and "gating function" in out[0].reason
    assert block.group("expert_in")[0].scalable
    # OLMo 2 normalizes sublayer outputs: nothing feeds q/k/v or the MLP through a norm
    olmo = AutoModelForCausalLM.from_config(AutoConfig.for_model("olmo2", **base)).eval()
    groups = {g.role: g for g in inspect_model(olmo).blocks[0].scale_groups}
    assert groups["attn_in"].prev is None and not groups["attn_in"].scalable
    assert groups["mlp_in"].prev is None and not groups["mlp_in"].scalable


def test_bert_without_head_and_opt_post_norm() -> None:
    info = inspect_model(tiny_model("bert", head=False))
    assert info.blocks_path == "encoder.layer" and info.lm_head is None and not info.is_decoder
    info = inspect_model(tiny_model("opt", do_layer_norm_before=False))
    assert info.post_norm
    assert not any(g.scalable for g in info.blocks[0].scale_groups if g.prev_kind == "norm")


def test_no_block_list_is_a_clear_error() -> None:
    with pytest.raises(ArchitectureError, match="no block list found in Sequential"):
        inspect_model(nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4)))
    with pytest.raises(ArchitectureError, match="takes a torch.nn.Module"):
        inspect_model("llama")  # type: ignore[arg-type]


def test_unsupported_fused_experts_is_a_clear_error() -> None:
    class OddExperts(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.gate_up_proj = nn.Parameter(torch.zeros(2, 8, 4))
            self.down_proj = nn.Parameter(torch.zeros(2, 4, 4))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.experts = OddExperts()
            self.proj = nn.Linear(4, 4)

    model = nn.Module()
    model.layers = nn.ModuleList([Block(), Block()])
    with pytest.raises(ArchitectureError, match="cannot unfuse the MoE experts layers.0.experts"):
        prepare_model(model)


def test_scale_group_is_the_contract_dataclass() -> None:
    fields = [f.name for f in dataclasses.fields(ScaleGroup)]
    assert fields[:6] == ["prev", "prev_kind", "linears", "role", "scalable", "reason"]


@requires_shared
def test_real_stories260k() -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(STORIES_DIR, dtype=torch.float32).eval()
    info = inspect_model(model)
    assert (info.family, info.blocks_path, len(info.blocks)) == ("llama", "model.layers", 5)
    assert info.embed == "model.embed_tokens" and info.lm_head == "lm_head" and info.final_norm == "model.norm"
    block = info.blocks[4]
    assert {n: (li.role, li.in_features, li.out_features) for n, li in block.linears.items()} == {
        "self_attn.q_proj": ("q", 64, 64), "self_attn.k_proj": ("k", 64, 32),
        "self_attn.v_proj": ("v", 64, 32), "self_attn.o_proj": ("o", 64, 64),
        "mlp.gate_proj": ("gate", 64, 172), "mlp.up_proj": ("up", 64, 172), "mlp.down_proj": ("down", 172, 64),
    }
    assert [g.scalable for g in block.scale_groups] == [True, True, True, True]
    assert (block.scale_groups[1].repeat, block.scale_groups[1].head_dim) == (2, 8)  # 8 heads / 4 kv heads
