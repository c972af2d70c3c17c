"""qcore.pipeline.engine: input capture for every tiny architecture, propagation, statistics, surgery."""
from __future__ import annotations

import gc
from typing import Any

import pytest
import torch
from torch import nn

from qcore.data import CalibrationData
from qcore.pipeline.engine import BlockContext, RunContext, run_chain
from qcore.plugin import (
    BaseQuantizer,
    CalibrationError,
    Capabilities,
    ConfigError,
    MethodSpec,
    Needs,
    QuantConfig,
)
from qcore.tiny import TINY_FAMILIES, tiny_model

SEQ = 80  # longer than the sliding window (64) of the tiny mistral and gemma2


def calib(model: nn.Module, n: int = 3, seq: int = SEQ, seed: int = 0) -> CalibrationData:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, int(model.config.vocab_size), (n, seq), generator=gen)
    return CalibrationData(ids, {"source": "random", "n_samples": n, "seq_len": seq, "seed": seed})


def reference_hidden(model: nn.Module, ids: torch.Tensor) -> list[torch.Tensor]:
    """hidden_states[i] of a plain forward pass = the input of block i."""
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids), output_hidden_states=True)
    return list(out.hidden_states)


def make_spec(name: str = "probe", kind: str = "transform", **caps: Any) -> MethodSpec:
    return MethodSpec(name=name, summary=name, config_cls=QuantConfig, quantizer="none:none",
                      capabilities=Capabilities(kind=kind, **caps))  # type: ignore[arg-type]


class Probe(BaseQuantizer):
    """A test quantizer with a real spec and an empty config."""

    def __init__(self, name: str = "probe", kind: str = "transform", config: QuantConfig | None = None) -> None:
        super().__init__(config or QuantConfig(), make_spec(name, kind))


class Recorder(Probe):
    """Records the hidden inputs each block is handed, then perturbs the block's weights."""

    def __init__(self, perturb: float = 0.0) -> None:
        super().__init__("recorder")
        self.perturb = perturb
        self.seen: list[tuple[str, list[torch.Tensor] | None]] = []
        self.float_ok: list[bool] = []

    def needs(self) -> Needs:
        return Needs(float_outputs=True)

    def process_block(self, block: BlockContext) -> None:
        hidden = [h.clone() for h in block.hidden_inputs()] if block.inputs is not None else None
        self.seen.append((block.name, hidden))
        if block.inputs is not None:
            now = block.forward()
            self.float_ok.append(all(torch.equal(a, b) for a, b in zip(now, block.float_outputs)))
        if self.perturb:
            with torch.no_grad():
                for name in block.quantizable():
                    block.linear(name).weight.mul_(1.0 - self.perturb)


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_float_propagation_inputs_equal_plain_forward(family: str) -> None:
    # 3 blocks: block 1's OUTPUT is checked too (gemma2's blocks 0/2 use a sliding-window mask,
    # block 1 a global one; each block must get its own)
    model = tiny_model(family, num_hidden_layers=3)
    cal = calib(model)
    ref = reference_hidden(model, cal.input_ids)
    rec = Recorder(perturb=0.3)  # changes every block: float propagation must not see it
    run_chain(model, [rec], cal, propagate="float", batch_size=2)
    n_blocks = len(rec.seen)
    assert n_blocks == model.config.num_hidden_layers
    assert all(rec.float_ok)
    for i, (_name, hidden) in enumerate(rec.seen):
        got = torch.cat(hidden, dim=0)  # batches of 2 + 1
        torch.testing.assert_close(got, ref[i], rtol=1e-5, atol=1e-5, msg=f"{family} block {i}")


@pytest.mark.parametrize("family", ["llama", "gemma2", "qwen3_moe", "gpt2", "bert"])
def test_quantized_propagation_sees_changed_blocks(family: str) -> None:
    model = tiny_model(family)
    cal = calib(model)
    rec = Recorder(perturb=0.3)
    run_chain(model, [rec], cal.input_ids, propagate="quantized", batch_size=4)  # plain ids work too
    # the model is now perturbed in place: block i's inputs are its hidden states
    ref = reference_hidden(model, cal.input_ids)
    for i, (_name, hidden) in enumerate(rec.seen):
        torch.testing.assert_close(hidden[0], ref[i], rtol=1e-5, atol=1e-5)
    # ...and differ from the float model's beyond block 0
    float_ref = reference_hidden(tiny_model(family), cal.input_ids)
    assert not torch.allclose(rec.seen[1][1][0], float_ref[1], atol=1e-4)


def test_calibration_free_chain_sees_every_block() -> None:
    model = tiny_model("llama", num_hidden_layers=3)
    rec = Recorder()
    run_chain(model, [rec], None)
    assert [n for n, _ in rec.seen] == ["model.layers.0", "model.layers.1", "model.layers.2"]
    assert all(h is None for _, h in rec.seen)


class Stats(Probe):
    def __init__(self) -> None:
        super().__init__("stats")
        self.out: dict[str, Any] = {}

    def process_block(self, block: BlockContext) -> None:
        if block.index == 1:
            names = block.quantizable()
            self.names = names
            for stat in ("hessian", "inputs", "absmax", "absmean"):
                self.out[stat] = block.observe(names, stat)


def test_collect_statistics_consistent() -> None:
    model = tiny_model("qwen3_moe")
    cal = calib(model, n=4, seq=16)
    st = Stats()
    run_chain(model, [st], cal, batch_size=2)
    assert not any("gate" == n.split(".")[-1] and "experts" not in n for n in st.names)  # no router
    for name in st.names:
        xs = st.out["inputs"][name]
        h = st.out["hessian"][name]
        if not xs:  # an expert no token was routed to
            assert h["nsamples"] == 0 and not h["hessian"].any()
            continue
        x = torch.cat(xs).double()
        n = x.shape[0]
        assert h["nsamples"] == n
        assert h["hessian"].dtype == torch.float32
        torch.testing.assert_close(h["hessian"].double(), 2.0 / n * x.T @ x, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(st.out["absmax"][name].double(), x.abs().amax(0), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(st.out["absmean"][name].double(), x.abs().mean(0), rtol=1e-5, atol=1e-6)
    dense = [n for n in st.names if "experts" not in n]
    assert st.out["hessian"][dense[0]]["nsamples"] == 4 * 16  # every token reaches attention


class EarlyStop(Probe):
    """Collects each true-sequential subset with and without cutting the forward short."""

    def __init__(self) -> None:
        super().__init__("early")
        self.pairs: list[tuple[dict, dict]] = []

    def process_block(self, block: BlockContext) -> None:
        for subset in block.info.sequential:
            self.pairs.append((block.observe(subset, "hessian", stop_early=True),
                               block.observe(subset, "hessian", stop_early=False)))


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_collect_stop_early_gives_the_same_statistics(family: str) -> None:
    model = tiny_model(family, num_hidden_layers=2)
    rec = EarlyStop()
    run_chain(model, [rec], calib(model, n=3, seq=24), batch_size=2)
    assert rec.pairs
    for early, full in rec.pairs:
        assert early.keys() == full.keys()
        for name in full:
            assert early[name]["nsamples"] == full[name]["nsamples"]
            torch.testing.assert_close(early[name]["hessian"], full[name]["hessian"], rtol=0, atol=0)


class FloatReader(Probe):
    def __init__(self, flag: bool) -> None:
        super().__init__("reader")
        self.flag = flag
        self.ok: list[bool] = []

    def needs(self) -> Needs:
        return Needs(float_outputs=self.flag)

    def process_block(self, block: BlockContext) -> None:
        before = block.float_outputs
        with torch.no_grad():
            for name in block.quantizable():
                block.linear(name).weight.mul_(0.5)
        self.ok.append(all(torch.equal(a, b) for a, b in zip(before, block.float_outputs)))


def test_float_outputs_only_on_request() -> None:
    model = tiny_model("llama", num_hidden_layers=2)
    reader = FloatReader(flag=True)
    run_chain(model, [reader], calib(model), batch_size=2)
    assert reader.ok == [True, True]
    with pytest.raises(CalibrationError, match="float_outputs=True"):
        run_chain(tiny_model("llama", num_hidden_layers=2), [FloatReader(flag=False)], calib(model))


def test_expert_stats_use_routed_tokens_only() -> None:
    model = tiny_model("qwen3_moe")
    cal = calib(model, n=4, seq=16)
    st = Stats()
    run_chain(model, [st], cal, batch_size=4)
    experts = [n for n in st.names if "experts" in n and n.endswith(("gate_proj", "up_proj"))]
    counts = [st.out["hessian"][n]["nsamples"] for n in experts]
    # top-2 of 4 experts: every token reaches exactly 2 experts (gate and up see the same tokens)
    assert sum(counts) == 2 * 2 * 4 * 16


class RTN(Probe):
    def __init__(self, ignore: list[str] | None = None) -> None:
        from qcore.plugin import WeightQuantConfig

        super().__init__("rtn-probe", "weight-only", WeightQuantConfig(bits=4, group_size=32, ignore=ignore or []))

    def process_block(self, block: BlockContext) -> None:
        from qcore.quant.primitives import quantize_rtn

        for name in block.quantizable(self.config):
            w = block.linear(name).weight.detach().float()
            block.quantize_linear(name, quantize_rtn(w, 4, 32, False))


class BackendProbe(RTN):
    """Quantizes like RTN, then records the backends the block's forward runs with."""

    def __init__(self) -> None:
        super().__init__()
        self.during: list[set[str]] = []

    def process_block(self, block: BlockContext) -> None:
        from qcore.quant.linear import QuantLinear

        super().process_block(block)
        block.forward()
        self.during.append({m.backend for m in block.module.modules() if isinstance(m, QuantLinear)})


def test_calibration_backend_during_the_block_then_auto() -> None:
    from qcore.pipeline.engine import CALIBRATION_BACKEND
    from qcore.quant.linear import QuantLinear

    model = tiny_model("llama", num_hidden_layers=2)
    probe = BackendProbe()
    run_chain(model, [probe], calib(model), batch_size=2)
    assert probe.during == [{CALIBRATION_BACKEND}] * 2
    mods = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert mods and all(m.backend == "auto" and m._cache is None for m in mods)


def test_quantize_linear_replaces_and_records() -> None:
    from qcore.quant.act import ActQuant
    from qcore.quant.linear import QuantLinear

    model = tiny_model("llama")
    ids = calib(model).input_ids
    with torch.no_grad():
        before = model(input_ids=ids).logits
    act = ActQuant(8, True, True)
    run = run_chain(model, [ActRequest({"self_attn.q_proj": act}), RTN(ignore=["model.layers.1.mlp.*"])], None)
    assert isinstance(run, RunContext)
    mods = model.qcore_record["modules"]
    assert "model.layers.0.self_attn.q_proj" in mods and "model.layers.1.self_attn.o_proj" in mods
    assert not any(k.startswith("model.layers.1.mlp.") for k in mods)
    assert isinstance(model.model.layers[0].mlp.down_proj, QuantLinear)
    assert isinstance(model.model.layers[1].mlp.down_proj, nn.Linear)
    assert mods["model.layers.0.mlp.down_proj"] == model.model.layers[0].mlp.down_proj.meta()
    q = model.model.layers[0].self_attn.q_proj
    assert q.act is act and mods["model.layers.0.self_attn.q_proj"]["act"] == act.to_dict()
    assert model.model.layers[0].self_attn.k_proj.act is None
    assert model.qcore_record["chain"][-1]["config"]["bits"] == 4
    with torch.no_grad():
        after = model(input_ids=ids).logits
    assert torch.isfinite(after).all() and not torch.equal(before, after)
    assert (after - before).abs().mean() < 0.1 * before.abs().mean()  # 4 bits: close to float


class ActRequest(Probe):
    """A transform asking for activation quantization on some linears of block 0."""

    def __init__(self, acts: dict[str, Any]) -> None:
        super().__init__("act-request")
        self.acts = acts

    def process_block(self, block: BlockContext) -> None:
        if block.index == 0:
            for name, act in self.acts.items():
                block.request_activation_quant(name, act)


def test_needs_calibration_error_and_bad_propagate() -> None:
    q = BaseQuantizer(QuantConfig(), make_spec("needy", "weight-only", needs_calibration=True))
    with pytest.raises(CalibrationError, match="needy"):
        run_chain(tiny_model("llama"), [q], None)
    with pytest.raises(ValueError, match="propagate"):
        run_chain(tiny_model("llama"), [], None, propagate="sideways")  # type: ignore[arg-type]


class Wants(Probe):
    def __init__(self, name: str, needs: Needs) -> None:
        super().__init__(name)
        self._needs = needs

    def needs(self) -> Needs:
        return self._needs


def test_conflicting_propagation_is_refused_before_any_work() -> None:
    model = tiny_model("llama")
    a, b = Wants("a", Needs(propagation="float")), Wants("b", Needs(propagation="quantized"))
    with pytest.raises(ConfigError, match="conflicting propagation"):
        run_chain(model, [a, b], calib(model))
    with pytest.raises(ConfigError, match="conflicting propagation"):
        run_chain(model, [a], calib(model), propagate="quantized")
    assert not hasattr(model, "qcore_record")


def live_activation_bytes(model: nn.Module) -> int:
    """Bytes of live tensors that are not the model's parameters or buffers (one count per storage)."""
    owned = {t.untyped_storage().data_ptr() for t in list(model.parameters()) + list(model.buffers())}
    seen: set[int] = set()
    total = 0
    gc.collect()
    for obj in gc.get_objects():
        if issubclass(type(obj), torch.Tensor) and not isinstance(obj, nn.Parameter) and obj.device.type == "cpu":
            st = obj.untyped_storage()
            ptr = st.data_ptr()
            if ptr and ptr not in owned and ptr not in seen:
                seen.add(ptr)
                total += st.nbytes()
    return total


class MemoryProbe(Probe):
    def __init__(self, model: nn.Module) -> None:
        super().__init__("memory")
        self.model = model
        self.live: list[int] = []

    def process_block(self, block: BlockContext) -> None:
        self.live.append(live_activation_bytes(self.model))


def test_live_activations_do_not_grow_with_depth() -> None:
    peaks = {}
    for depth in (2, 6):
        model = tiny_model("llama", num_hidden_layers=depth)
        cal = calib(model, n=8, seq=64)
        probe = MemoryProbe(model)
        run_chain(model, [probe], cal, batch_size=4)
        peaks[depth] = max(probe.live)
        # the same at every block: nothing of earlier blocks is kept
        assert max(probe.live) - min(probe.live) < 0.05 * max(probe.live)
    one_set = 8 * 64 * 64 * 4  # one block's hidden states, float32
    assert peaks[2] > one_set  # the block inputs are alive (the probe sees something)
    assert abs(peaks[6] - peaks[2]) < one_set, peaks


class GradReader(Probe):
    """Reads the gradient pass's results and an output observer at block 0."""

    def __init__(self) -> None:
        super().__init__("grad-reader")
        self.grads: list[torch.Tensor] = []
        self.fisher: dict[str, torch.Tensor] = {}
        self.out_absmax: dict[str, torch.Tensor] = {}

    def needs(self) -> Needs:
        return Needs(gradients=True, gradient_observers=("fisher",))

    def process_block(self, block: BlockContext) -> None:
        if block.index == 0:
            self.grads = block.output_gradients()
            self.fisher = block.observe(["mlp.down_proj"], "fisher")
            self.out_absmax = block.observe(["mlp.down_proj"], "out_absmax")


def test_gradient_pass_and_gradient_and_output_observers() -> None:
    model = tiny_model("llama")
    cal = calib(model, n=2, seq=12)
    # reference: one backward of the LM loss per window, with the block output and down_proj I/O kept
    kept: dict[str, Any] = {}
    block0 = model.model.layers[0]
    down = block0.mlp.down_proj
    h1 = block0.register_forward_hook(lambda m, a, out: kept.__setitem__("h", (out[0] if isinstance(out, tuple) else out)))
    h2 = down.register_forward_hook(lambda m, a, out: kept.update(x=a[0], y=out))
    ref_grad, fisher, y_max = [], torch.zeros_like(down.weight), torch.zeros(down.out_features)
    for row in cal.input_ids:
        ids = row[None]
        kept.clear()
        out = model(input_ids=ids, labels=ids)
        for t in (kept["h"], kept["y"]):
            t.retain_grad()
        out.loss.backward()
        ref_grad.append(kept["h"].grad.detach().clone())
        g = kept["y"].grad[0].detach()
        x = kept["x"][0].detach()
        fisher += (g.t() @ x) ** 2
        y_max = torch.maximum(y_max, kept["y"][0].detach().abs().amax(0))
        model.zero_grad(set_to_none=True)
    h1.remove()
    h2.remove()
    reader = GradReader()
    run_chain(model, [reader], cal, batch_size=2)  # both windows in one batch: still per-window sums
    got = torch.cat([g.float() for g in reader.grads])
    torch.testing.assert_close(got, torch.cat(ref_grad), rtol=2e-2, atol=1e-6)  # stored in bfloat16
    torch.testing.assert_close(reader.fisher["mlp.down_proj"], fisher, rtol=1e-3, atol=1e-12)
    torch.testing.assert_close(reader.out_absmax["mlp.down_proj"], y_max, rtol=1e-5, atol=1e-6)
    assert all(not p.requires_grad or p.grad is None for p in model.parameters())


def test_gradient_observer_must_be_declared() -> None:
    class Undeclared(Probe):
        def process_block(self, block: BlockContext) -> None:
            block.observe(["mlp.down_proj"], "fisher")

    model = tiny_model("llama")
    with pytest.raises(CalibrationError, match="gradient_observers"):
        run_chain(model, [Undeclared()], calib(model, n=1, seq=8))


class Rotate(Probe):
    """Puts a fixed orthogonal input transform on down_proj (as an online rotation would)."""

    def __init__(self, q: torch.Tensor) -> None:
        super().__init__("rotate")
        self.q = q

    def process_block(self, block: BlockContext) -> None:
        block.set_input_transform("mlp.down_proj", Orthogonal(self.q))


class Orthogonal(nn.Module):
    def __init__(self, q: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("q", q)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.q.t()


class HessianAfter(Probe):
    def __init__(self) -> None:
        super().__init__("hessian-after", "weight-only")
        self.seen: dict[str, Any] = {}
        self.inputs: list[torch.Tensor] = []
        self.scalable: dict[str, bool] = {}

    def process_block(self, block: BlockContext) -> None:
        if block.index == 0:
            self.seen = block.observe(["mlp.down_proj"], "hessian")
            self.inputs = block.observe(["mlp.down_proj"], "inputs")["mlp.down_proj"]
            self.scalable = {g.role: g.scalable for g in block.info.scale_groups}


def test_observers_see_the_input_after_its_transform_and_folds_stop_there() -> None:
    from qcore.arch.introspect import inspect_model

    model = tiny_model("llama")
    q = torch.linalg.qr(torch.randn(128, 128, generator=torch.Generator().manual_seed(0)))[0]
    cal = calib(model, n=2, seq=16)
    raw = []
    h = model.model.layers[0].mlp.down_proj.register_forward_pre_hook(lambda m, a: raw.append(a[0].reshape(-1, 128)))
    with torch.no_grad():
        model(input_ids=cal.input_ids)
    h.remove()
    probe = HessianAfter()
    run_chain(model, [Rotate(q), probe], cal, batch_size=2)
    x = torch.cat(raw) @ q.t()
    torch.testing.assert_close(torch.cat(probe.inputs), x, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(probe.seen["mlp.down_proj"]["hessian"], 2.0 / x.shape[0] * x.t() @ x, rtol=1e-4, atol=1e-5)
    groups = {g.role: g for g in inspect_model(model).blocks[0].scale_groups}
    assert not groups["mlp_out"].scalable and "input transform" in groups["mlp_out"].reason
    assert groups["mlp_in"].scalable
