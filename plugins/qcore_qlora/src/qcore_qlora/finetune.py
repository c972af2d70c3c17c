"""Causal-LM fine-tuning of QLoRA adapters, with checkpoints and exact resume.

Protocol (all of it is in :class:`FinetuneResult.record`):

* text: :func:`qcore.data.read_texts` (files, a directory, ``.jsonl``, a ``datasets.Dataset``,
  the shared corpus names), joined with ``"\\n\\n"``. Without ``eval_data`` the last
  ``heldout_fraction`` of the characters (cut at a blank line) is held out for evaluation and
  never trained on.
* batches: ``batch_size`` windows of ``seq_len`` tokens at offsets drawn by a generator seeded
  with ``(seed, step)``, so the data order needs no saved state.
* AdamW on the adapter weights only, linear warmup then cosine decay to 10% of ``lr``,
  gradient clipping, optional gradient checkpointing.
* a checkpoint every ``save_every`` steps (and at the end) in ``output_dir/checkpoints/step-N``:
  the adapter in peft's format, the optimizer tensors in safetensors, the RNG state in
  safetensors, scalars (step, scheduler, losses) in JSON, written to a temporary directory and
  renamed, so an interruption never leaves a half-written checkpoint. ``resume=True`` continues
  from the newest one; the result is bit-identical to an uninterrupted run on the same machine
  and thread count (tested).
"""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from qcore.plugin import CalibrationError, CheckpointError, ConfigError
from qcore.plugin import bar, get_logger

from qcore_qlora.adapter import load_adapter, save_adapter
from qcore_qlora.serialize import restore_peft_state

log = get_logger("qlora")

CHECKPOINT_FORMAT = "qcore-qlora-checkpoint"
CHECKPOINT_VERSION = 1
CHECKPOINTS = "checkpoints"
FINAL_ADAPTER = "adapter"
RESULT_FILE = "finetune.json"
STATE_FILE = "trainer_state.json"
OPTIMIZER_FILE = "optimizer.safetensors"
RNG_FILE = "rng.safetensors"
KEEP_CHECKPOINTS = 2
DEFAULT_HELDOUT_FRACTION = 0.1
MIN_LR_RATIO = 0.1
#: Options that change the training trajectory: a resumed run must use the same values.
TRAJECTORY_KEYS = ("steps", "lr", "batch_size", "seq_len", "seed", "warmup_steps", "weight_decay",
                   "max_grad_norm", "train_sha256", "n_train_tokens")
_STEP_DIR = re.compile(r"^step-(\d{6,})$")


@dataclass
class FinetuneResult:
    """What :func:`finetune` did. ``evals`` holds ``{"step", "perplexity"}`` rows (step 0 = base)."""

    steps: int
    losses: list[float]
    evals: list[dict[str, float]]
    base_perplexity: float | None
    final_perplexity: float | None
    output_dir: str | None
    adapter_dir: str | None
    resumed_from: int
    seconds: float
    record: dict[str, Any]
    merged_perplexity: float | None = None
    then: str | None = None
    then_path: str | None = None
    then_perplexity: float | None = None
    then_model: Any = field(default=None, repr=False, compare=False)

    def to_json_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out.pop("then_model")
        return out

    def __str__(self) -> str:
        rows = [("steps", str(self.steps)), ("resumed from step", str(self.resumed_from)),
                ("final train loss", _fmt(self.losses[-1] if self.losses else None)),
                ("held-out perplexity, NF4 base", _fmt(self.base_perplexity)),
                ("held-out perplexity, fine-tuned", _fmt(self.final_perplexity))]
        if self.merged_perplexity is not None:
            rows.append(("held-out perplexity, merged float", _fmt(self.merged_perplexity)))
        if self.then:
            rows.append((f"held-out perplexity, merged + {self.then}", _fmt(self.then_perplexity)))
            rows.append((f"{self.then} checkpoint", str(self.then_path)))
        rows.append(("adapter", str(self.adapter_dir)))
        width = max(len(r[0]) for r in rows)
        return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.4f}"


# -- pure pieces -----------------------------------------------------------------------------------
def split_heldout(text: str, fraction: float) -> tuple[str, str, int]:
    """``(train, heldout, cut)``: the last ``fraction`` of ``text``, cut at a blank line if one is near."""
    if not 0.0 < fraction < 1.0:
        raise ConfigError(f"heldout_fraction must be in (0, 1), got {fraction}; e.g. 0.1, or pass eval_data")
    cut = int(len(text) * (1.0 - fraction))
    para = text.find("\n\n", cut)
    if para != -1 and para - cut < max(1000, len(text) // 100):
        cut = para
    return text[:cut], text[cut:].lstrip("\n"), cut


def lr_factor(step: int, steps: int, warmup: int) -> float:
    """Learning-rate multiplier for ``step`` (0-based): linear warmup, cosine decay to 10%."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return MIN_LR_RATIO + (1.0 - MIN_LR_RATIO) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


class _LRFactor:
    """Picklable-free callable for ``LambdaLR`` (state lives in the scheduler's JSON)."""

    def __init__(self, steps: int, warmup: int) -> None:
        self.steps, self.warmup = steps, warmup

    def __call__(self, step: int) -> float:
        return lr_factor(step, self.steps, self.warmup)


def batch_starts(n_tokens: int, seq_len: int, batch_size: int, seed: int, step: int) -> Tensor:
    """Window starts of ``step``'s batch: uniform in ``[0, n_tokens - seq_len]``, from ``(seed, step)``."""
    gen = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(step))
    return torch.randint(0, n_tokens - seq_len + 1, (batch_size,), generator=gen)


def optimizer_state_to_safetensors(state: dict[str, Any]) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Split an optimizer ``state_dict`` into tensors (safetensors) and JSON scalars."""
    tensors: dict[str, Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, per_param in state["state"].items():
        for key, value in per_param.items():
            if isinstance(value, Tensor):
                tensors[f"state.{idx}.{key}"] = value.detach().contiguous().cpu()
            else:
                scalars.setdefault(str(idx), {})[key] = value
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in state["param_groups"]]
    return tensors, {"param_groups": groups, "scalars": scalars}


def optimizer_state_from_safetensors(tensors: dict[str, Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    """Inverse of :func:`optimizer_state_to_safetensors`."""
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        _, idx, key = name.split(".", 2)
        state.setdefault(int(idx), {})[key] = value
    for idx, values in meta.get("scalars", {}).items():
        state.setdefault(int(idx), {}).update(values)
    groups = [{k: (tuple(v) if k == "betas" else v) for k, v in g.items()} for g in meta["param_groups"]]
    return {"state": state, "param_groups": groups}


def rng_state() -> dict[str, Tensor]:
    out = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            out[f"cuda.{i}"] = s
    return out


def set_rng_state(tensors: dict[str, Tensor]) -> None:
    torch.set_rng_state(tensors["torch_cpu"])
    cuda = [tensors[k] for k in sorted((k for k in tensors if k.startswith("cuda.")), key=lambda k: int(k[5:]))]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


# -- checkpoints -----------------------------------------------------------------------------------
def checkpoint_dirs(output_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = Path(output_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir()
             if (m := _STEP_DIR.match(p.name)) and (p / STATE_FILE).is_file()]
    return [p for _, p in sorted(found)]


def save_checkpoint(output_dir: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: Any, state: dict[str, Any], keep: int = KEEP_CHECKPOINTS) -> Path:
    """Write ``checkpoints/step-N`` atomically and drop all but the newest ``keep``."""
    from safetensors.torch import save_file

    from qcore.plugin import atomic_dir, write_json

    final = Path(output_dir) / CHECKPOINTS / f"step-{state['step']:06d}"
    opt_tensors, opt_meta = optimizer_state_to_safetensors(optimizer.state_dict())
    sched = {k: v for k, v in scheduler.state_dict().items() if k != "lr_lambdas"}
    doc = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, **state,
           "optimizer": opt_meta, "scheduler": sched}
    with atomic_dir(final, overwrite=True, kind="fine-tuning checkpoint") as tmp:
        save_adapter(model, tmp / FINAL_ADAPTER)
        save_file(opt_tensors, str(tmp / OPTIMIZER_FILE))
        save_file(rng_state(), str(tmp / RNG_FILE))
        write_json(tmp / STATE_FILE, doc)
    for old in checkpoint_dirs(output_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: Any) -> dict[str, Any]:
    """Restore adapter, optimizer, scheduler and RNG from ``path``; returns the JSON state."""
    from safetensors.torch import load_file

    try:
        doc = json.loads((path / STATE_FILE).read_text(encoding="utf-8"))
        opt_tensors = load_file(str(path / OPTIMIZER_FILE))
        rng = load_file(str(path / RNG_FILE))
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the same user problem
        raise CheckpointError(f"checkpoint {path} is unreadable ({type(exc).__name__}: {exc}); delete it "
                              "to resume from the one before, or pass resume=False") from None
    if doc.get("format") != CHECKPOINT_FORMAT or doc.get("version", 0) > CHECKPOINT_VERSION:
        raise CheckpointError(f"{path} is not a {CHECKPOINT_FORMAT} v{CHECKPOINT_VERSION} checkpoint; "
                              "use another output_dir or pass resume=False")
    load_adapter(model, path / FINAL_ADAPTER)
    optimizer.load_state_dict(optimizer_state_from_safetensors(opt_tensors, doc["optimizer"]))
    scheduler.load_state_dict({**doc["scheduler"], "lr_lambdas": [None] * len(optimizer.param_groups)})
    set_rng_state(rng)
    return doc


# -- evaluation ------------------------------------------------------------------------------------
def heldout_perplexity(model: nn.Module, tokenizer: Any, text: str, seq_len: int,
                       max_tokens: int | None = None) -> float:
    """Perplexity of ``model`` on ``text`` with qcore's pinned protocol (:mod:`qcore.eval`)."""
    from qcore.plugin import perplexity

    was_training = model.training
    model.eval()
    try:
        result = perplexity(model, [text], tokenizer, seq_len=seq_len, max_tokens=max_tokens)
    finally:
        model.train(was_training)
    return float(result.ppl)


# -- training --------------------------------------------------------------------------------------
def _train_step(model: nn.Module, batch: Tensor, optimizer: torch.optim.Optimizer, scheduler: Any,
                max_grad_norm: float) -> float:
    loss = model(input_ids=batch, labels=batch).loss
    if not torch.isfinite(loss):
        raise ConfigError(f"training loss became {loss.item()}; lower lr (now {scheduler.get_last_lr()[0]:.2e}) "
                          "or use compute_dtype='float32'")
    loss.backward()
    params = [p for g in optimizer.param_groups for p in g["params"]]
    if max_grad_norm > 0:
        torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return float(loss.detach())


def _set_checkpointing(model: nn.Module, on: bool) -> bool:
    """Turn activation (gradient) checkpointing on or off; False if the model cannot."""
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5
        if on:
            model.activation_checkpointing_enable({"use_reentrant": False})
        else:
            model.activation_checkpointing_disable()
        return True
    if hasattr(model, "gradient_checkpointing_enable"):
        if on:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_disable()
        return True
    log.warning("%s has no gradient checkpointing; training without it", type(model).__name__)
    return False


def _texts(source: Any) -> str:
    from qcore.plugin import TEXT_SEPARATOR, read_texts

    return TEXT_SEPARATOR.join(read_texts(source))


def finetune(
    model: nn.Module,
    data: Any,
    tokenizer: Any = None,
    *,
    steps: int = 200,
    lr: float = 2e-4,
    batch_size: int = 4,
    seq_len: int = 256,
    grad_checkpointing: bool = True,
    eval_data: Any = None,
    eval_every: int = 0,
    save_every: int = 50,
    output_dir: str | os.PathLike | None = None,
    resume: bool = True,
    seed: int = 0,
    then: str | None = None,
    then_options: dict[str, Any] | None = None,
    heldout_fraction: float = DEFAULT_HELDOUT_FRACTION,
    warmup_steps: int | None = None,
    weight_decay: float = 0.0,
    max_grad_norm: float = 1.0,
    eval_max_tokens: int | None = None,
) -> FinetuneResult:
    """Train the LoRA adapters of a QLoRA model (``qcore.quantize(model, "qlora")``) on text.

    ``data``/``eval_data``: anything :func:`qcore.data.read_texts` takes. Without ``eval_data``
    the last ``heldout_fraction`` of ``data`` is held out. Held-out perplexity is measured before
    training (the NF4 base), every ``eval_every`` steps (0: only before and after) and at the end.
    ``output_dir``: checkpoints every ``save_every`` steps, the final adapter (``adapter/``, peft
    format) and ``finetune.json``; with ``resume`` a run continues from its newest checkpoint.
    ``then``: after training, merge the adapter into a float copy and quantize it with that qcore
    method (``then_options``, e.g. ``{"bits": 4}``; ``"float"`` keeps the merged float model),
    saved to ``output_dir/merged-<then>``.
    """
    from qcore.plugin import text_sha256, tokenize_text

    start_time = time.perf_counter()
    then_options = dict(then_options or {})
    tokenizer = tokenizer if tokenizer is not None else getattr(model, "qcore_tokenizer", None)
    if tokenizer is None:
        raise ConfigError("finetune needs the model's tokenizer: pass tokenizer=... "
                          "(qcore.models.load_model returns it)")
    restore_peft_state(model)  # a model from qcore.load carries its LoRA layers but not peft's config
    if not hasattr(model, "peft_config"):
        raise ConfigError("finetune needs a model with LoRA adapters: run qcore.quantize(model, 'qlora', ...) first")
    for name, value in (("steps", steps), ("batch_size", batch_size), ("seq_len", seq_len)):
        if int(value) < 1:
            raise ConfigError(f"{name} must be a positive integer, got {value}")
    if save_every < 0 or eval_every < 0:
        raise ConfigError("save_every and eval_every must be >= 0 (0 turns periodic saves/evals off)")
    warmup = int(warmup_steps) if warmup_steps is not None else min(100, steps // 10)

    text = _texts(data)
    if eval_data is not None:
        train_text, eval_text, split = text, _texts(eval_data), {"eval_source": _describe(eval_data)}
    elif heldout_fraction > 0:
        train_text, eval_text, cut = split_heldout(text, heldout_fraction)
        split = {"heldout_fraction": heldout_fraction, "heldout_from_char": cut, "chars": len(text)}
    else:
        train_text, eval_text, split = text, "", {"heldout_fraction": 0.0}
    ids = torch.tensor(tokenize_text(tokenizer, train_text), dtype=torch.long)
    if len(ids) < seq_len:
        raise CalibrationError(f"training text has {len(ids)} tokens, fewer than seq_len={seq_len}; "
                               "give more text or lower seq_len")
    options = {"steps": int(steps), "lr": float(lr), "batch_size": int(batch_size), "seq_len": int(seq_len),
               "seed": int(seed), "warmup_steps": warmup, "weight_decay": float(weight_decay),
               "max_grad_norm": float(max_grad_norm), "train_sha256": text_sha256([train_text]),
               "n_train_tokens": len(ids)}
    record: dict[str, Any] = {"data": _describe(data), **split, **options,
                              "grad_checkpointing": bool(grad_checkpointing), "eval_every": int(eval_every),
                              "save_every": int(save_every), "eval_max_tokens": eval_max_tokens}

    device = next(p for p in model.parameters()).device
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ConfigError("the model has no trainable (LoRA) parameters; quantize with qcore.quantize(model, 'qlora')")
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _LRFactor(steps, warmup))
    losses: list[float] = []
    evals: list[dict[str, float]] = []
    start = 0
    out = Path(output_dir) if output_dir is not None else None
    if out is not None and not resume:
        shutil.rmtree(out / CHECKPOINTS, ignore_errors=True)
    latest = checkpoint_dirs(out)[-1] if out is not None and resume and checkpoint_dirs(out) else None
    if latest is not None:
        doc = load_checkpoint(latest, model, optimizer, scheduler)
        stale = {k: (doc["options"].get(k), options[k]) for k in TRAJECTORY_KEYS if doc["options"].get(k) != options[k]}
        if stale:
            detail = ", ".join(f"{k}: checkpoint {a!r} vs now {b!r}" for k, (a, b) in stale.items())
            raise CheckpointError(f"cannot resume from {latest}: it was made with other options ({detail}); "
                                  "pass the same options, resume=False to start over, or another output_dir")
        start, losses, evals = int(doc["step"]), list(doc["losses"]), list(doc["evals"])
        log.info("resuming from %s (step %d of %d)", latest, start, steps)
    else:
        torch.manual_seed(seed)  # LoRA dropout masks

    def evaluate(step: int) -> None:
        if eval_text:
            ppl = heldout_perplexity(model, tokenizer, eval_text, seq_len, eval_max_tokens)
            evals.append({"step": step, "perplexity": ppl})
            log.info("step %d: held-out perplexity %.4f", step, ppl)

    def state(step: int) -> dict[str, Any]:
        return {"step": step, "options": options, "losses": losses, "evals": evals, "record": record}

    use_cache = getattr(getattr(model, "config", None), "use_cache", None)
    checkpointing = grad_checkpointing and _set_checkpointing(model, True)
    if use_cache is not None:
        model.config.use_cache = False
    was_training = model.training
    try:
        if start == 0 and not evals:
            evaluate(0)
        model.train()
        progress = bar(total=steps, desc="finetune", unit="step")
        progress.update(start)
        for step in range(start, steps):
            starts = batch_starts(len(ids), seq_len, batch_size, seed, step)
            batch = torch.stack([ids[s:s + seq_len] for s in starts.tolist()]).to(device)
            losses.append(_train_step(model, batch, optimizer, scheduler, max_grad_norm))
            progress.update(1)
            progress.set_postfix(loss=f"{losses[-1]:.4f}", lr=f"{scheduler.get_last_lr()[0]:.2e}")
            done = step + 1
            if eval_every and done % eval_every == 0 and done < steps:
                evaluate(done)
                model.train()
            if out is not None and ((save_every and done % save_every == 0) or done == steps):
                save_checkpoint(out, model, optimizer, scheduler, state(done))
        progress.close()
        if not evals or evals[-1]["step"] != steps:
            evaluate(steps)
    finally:
        if checkpointing:
            _set_checkpointing(model, False)
        if use_cache is not None:
            model.config.use_cache = use_cache
        model.train(was_training)
    model.eval()

    base = next((e["perplexity"] for e in evals if e["step"] == 0), None)
    final = evals[-1]["perplexity"] if evals and evals[-1]["step"] == steps else None
    result = FinetuneResult(steps=steps, losses=losses, evals=evals, base_perplexity=base,
                            final_perplexity=final, output_dir=str(out) if out else None, adapter_dir=None,
                            resumed_from=start, seconds=0.0, record=record)
    if out is not None:
        result.adapter_dir = str(save_adapter(model, out / FINAL_ADAPTER))
    if then is not None:
        _then(result, model, tokenizer, then, then_options, train_text, eval_text, seq_len, eval_max_tokens, out)
    result.seconds = round(time.perf_counter() - start_time, 3)
    if out is not None:
        from qcore.plugin import write_json

        write_json(out / RESULT_FILE, result.to_json_dict())
    return result


def _then(result: FinetuneResult, model: nn.Module, tokenizer: Any, then: str, then_options: dict[str, Any],
          train_text: str, eval_text: str, seq_len: int, eval_max_tokens: int | None, out: Path | None) -> None:
    """Merge to float, optionally quantize with another method, evaluate and save."""
    from qcore_qlora.merge import add_provenance, merge_and_unload_to_float

    merged = merge_and_unload_to_float(model)
    if eval_text:
        result.merged_perplexity = heldout_perplexity(merged, tokenizer, eval_text, seq_len, eval_max_tokens)
    result.then = then
    path = out / f"merged-{then}" if out is not None else None
    if then == "float":
        if path is not None:
            from qcore.plugin import save_float

            save_float(merged, path, tokenizer if hasattr(tokenizer, "save_pretrained") else None)
        result.then_perplexity = result.merged_perplexity
    else:
        from qcore.plugin import quantize
        from qcore.plugin import tokenize_text

        opts = dict(then_options)
        opts.setdefault("calibration", [train_text])
        if "seq_len" not in opts:
            opts["seq_len"] = seq_len
        if "n_samples" not in opts:
            n_tokens = len(tokenize_text(tokenizer, train_text)) if opts["calibration"] == [train_text] else None
            opts["n_samples"] = min(128, n_tokens // opts["seq_len"]) if n_tokens else 128
        quantize(merged, then, tokenizer=tokenizer, **opts)
        add_provenance(merged, model, finetune=result.record)
        if eval_text:
            result.then_perplexity = heldout_perplexity(merged, tokenizer, eval_text, seq_len, eval_max_tokens)
        if path is not None:
            from qcore.plugin import save

            save(merged, path, tokenizer=tokenizer)
    result.then_path = str(path) if path is not None else None
    result.then_model = merged


def _describe(source: Any) -> str:
    from qcore.plugin import describe_source

    return describe_source(source)
