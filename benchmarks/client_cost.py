"""Client cost of offsite-tuning vs full fine-tuning: training throughput, memory, FLOPs.

The paper's efficiency comparison, measured the way this project's clients train: every
method runs ``fl_offsite.learn.train.train_local`` (AdamW, answer-only loss with the LM head applied
only where a label is) on a model built with the project's own split / LoRA code:

  full          the full model, every parameter trains (FedAvg full fine-tuning)
  full-lora     LoRA on every block of the full model (FedAvg-LoRA)
  offsite       the l-k-r emulator, only the adapter blocks train
  offsite-lora  the emulator with LoRA on the adapter blocks
  offsite-head  ablation: offsite with the LM head over every position (no logits_to_keep)

Weights are random (built from the model's config): speed and memory do not depend on them.
Timing is interleaved (A B C D E, A B C D E, ...) in one process and reported as medians,
so drift of a shared machine falls on every method alike; ratios are fairer than absolute
numbers. Memory:
  * tensors: params + grads + AdamW state (from the parameters) + activations saved for
    backward (measured with a saved-tensors hook over one forward, each storage once,
    parameters excluded) -- what the method must hold at the start of its backward pass;
  * process peak (CPU): each method in a fresh subprocess that builds its model, frees the
    rest (gc + malloc_trim), resets the kernel's peak-RSS counter (/proc/self/clear_refs 5)
    and trains; VmHWM is then the real resident peak of a client holding only that model;
  * GPU: torch.cuda.max_memory_allocated around each method's round, with only that
    method's model on the GPU.
The theoretical FLOP ratio (see ``flops_per_row``) is the limit the measured speed-up tends
to when every FLOP costs the same.

  .venv/bin/python benchmarks/client_cost.py                       # CPU protocol, smollm2-135m 2-8-2
  .venv/bin/python benchmarks/client_cost.py --protocol paper      # batch 1, block 512, LM loss, bf16 on GPU
  .venv/bin/python benchmarks/client_cost.py --protocol paper --model gpt2-xl --flops-only
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import ctypes
import gc
import json
import os
import platform
import statistics
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

import fl_offsite.learn.train as train_mod
from fl_offsite.learn.train import TrainSettings, freeze_except, half_frozen, train_local
from fl_offsite.surgery.blocks import find_blocks
from fl_offsite.surgery.lora import LoraSpec, add_lora, lora_blocks, lora_names
from fl_offsite.surgery.split import adapter_names, build_emulator, plan_split

if __package__:  # python -m benchmarks.client_cost, or imported
    from .common import features, in_fresh_process, status_kb
else:  # python benchmarks/client_cost.py: this folder is sys.path[0]
    from common import features, in_fresh_process, status_kb

warnings.filterwarnings("ignore", category=FutureWarning)

METHODS = ("full", "full-lora", "offsite", "offsite-lora", "offsite-head")

# Hand-written configs (no hub): the paper's medium models.
CONFIGS = {
    "gpt2-xl": dict(model_type="gpt2", vocab_size=50257, n_embd=1600, n_layer=48, n_head=25, n_positions=1024,
                    n_inner=None, activation_function="gelu_new", bos_token_id=50256, eos_token_id=50256),
    "opt-1.3b": dict(model_type="opt", vocab_size=50272, hidden_size=2048, ffn_dim=8192, num_hidden_layers=24,
                     num_attention_heads=32, max_position_embeddings=2048, word_embed_proj_dim=2048,
                     do_layer_norm_before=True, pad_token_id=1, bos_token_id=2, eos_token_id=2),
    "tiny": dict(model_type="llama", vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=8,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                 tie_word_embeddings=True),
}
# Split defaults: smollm2 as the demo (2-8-2); the paper's medium models keep half the middle.
SPLITS = {"smollm2-135m": (2, 2, 8, None), "gpt2-xl": (2, 2, None, 0.5), "opt-1.3b": (2, 2, None, 0.5),
          "tiny": (1, 1, 2, None)}
PROTOCOLS = {  # batch, seq, answer tokens (0 = every token, plain LM), steps per round, rounds
    "cpu": dict(batch=4, seq=128, answer=2, steps=2, rounds=5, precision="fp32"),
    "paper": dict(batch=1, seq=512, answer=0, steps=4, rounds=5, precision="bf16"),
}


def model_config(name: str):
    if name in CONFIGS:
        spec = dict(CONFIGS[name])
        return AutoConfig.for_model(spec.pop("model_type"), **spec)
    from fl_offsite.data.models import resolve_model_path

    return AutoConfig.from_pretrained(resolve_model_path(name))  # a local folder or offline alias


def split_args(args) -> tuple[int, int, int | None, float | None]:
    if args.split:
        bottom, k, top = (int(x) for x in args.split.split("-"))
        return bottom, top, k, None
    return SPLITS.get(args.model, (2, 2, None, 0.5))


def precision_of(method: str, args) -> str:
    """``offsite@bf16`` runs offsite in bf16 whatever --precision says."""
    return method.partition("@")[2] or args.precision


def build(method: str, full: torch.nn.Module, args) -> tuple[torch.nn.Module, set[str]]:
    """The model a client of ``method`` trains, and the names of its trainable parameters."""
    method = method.partition("@")[0]
    spec = LoraSpec(r=args.lora_r)
    if method.startswith("full"):
        model = copy.deepcopy(full)
        plan = None
    else:
        bottom, top, k, drop = split_args(args)
        plan = plan_split(full, bottom, top, emulator_layers=k, drop_ratio=drop)
        model = build_emulator(full, plan)
    if method.endswith("-lora"):
        model = add_lora(model, spec, lora_blocks(model, plan))
    return model, set(trainable_names(model, plan).values())


def trainable_names(model, plan) -> dict[str, str]:
    """What the client app trains (as fl_offsite's payload names): LoRA factors, the adapter, or everything."""
    if any(".lora_" in n for n, _ in model.named_parameters()):
        return lora_names(model, plan)
    if plan is not None:
        return adapter_names(model, plan)
    return {name: name for name, _ in model.named_parameters()}


def full_logits_loss(model, batch):
    """answer_loss without logits_to_keep: the LM head over every position (the ablation)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    return train_mod.token_cross_entropy(logits, batch["labels"][:, 1:])


@dataclass(frozen=True)
class Placement:
    """Where the models train. On a GPU each method's model is parked on the CPU between its rounds (``park``),
    so that the allocator's peak is that method's alone; --resident keeps every model on the GPU (no transfers,
    much faster) and subtracts the other models' resident bytes from the peak instead."""

    device: torch.device
    park: bool = True

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def enter(self, model) -> None:
        """Move a parked model to the GPU for its round."""
        if self.cuda and self.park:
            model.to(self.device)
            torch.cuda.empty_cache()

    def leave(self, model) -> None:
        """Park the model on the CPU again after its round."""
        if self.cuda and self.park:
            model.to("cpu")
            torch.cuda.empty_cache()

    def call(self, fn, model, *args):
        """``fn(*args)`` with ``model`` on the device for the call."""
        self.enter(model)
        try:
            return fn(*args)
        finally:
            self.leave(model)

    def others_bytes(self, model) -> int:
        """Bytes on the GPU that are not ``model``'s round: the other models (none unless resident); 0 on the CPU."""
        if not self.cuda:
            return 0
        return torch.cuda.memory_allocated(self.device) - resident_bytes(model) * (not self.park)


def resident_bytes(model) -> int:
    """Bytes of the model's parameters and buffers (each storage once)."""
    tensors = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
               for t in [*model.parameters(), *model.buffers()]}
    return sum(tensors.values())


def run_round(method: str, model, trainable, rows, args, placement: Placement,
              move: bool = True) -> train_mod.TrainStats:
    """One round of ``args.steps`` steps; on a GPU the model goes there for the round and back (``move``)."""
    settings = TrainSettings(lr=1e-5, batch_size=args.batch, local_steps=args.steps,
                             precision=precision_of(method, args))
    original = train_mod.answer_loss
    if method.startswith("offsite-head"):
        train_mod.answer_loss = full_logits_loss
    try:
        if move:
            placement.enter(model)
        if placement.cuda:
            torch.cuda.synchronize()
        stats = train_local(model, trainable, rows, settings, pad_id=0, desc=method)
        if placement.cuda:
            torch.cuda.synchronize()
        for param in model.parameters():
            param.grad = None  # train_local leaves the last step's gradients
        if move:
            placement.leave(model)
        return stats
    finally:
        train_mod.answer_loss = original


# Op kinds of the profile's breakdown, by substrings of the op or kernel name (the first kind that matches).
OP_KINDS = {"log-softmax / cross-entropy": ("softmax", "nll_loss", "cunn_spatial"),
            "matmul": ("gemm", "cutlass", "xmma", "nvjet", "sm90_", "aten::mm", "aten::addmm", "aten::bmm"),
            "attention": ("flash", "fmha", "attention", "sdpa"),
            "optimizer (AdamW, clip)": ("multi_tensor", "adam", "_foreach"),
            "copies / casts": ("memcpy", "memset", "copy", "aten::to", "aten::cat")}


def profile_step(method: str, model, trainable, rows, args, placement: Placement, top: int = 15) -> dict:
    """One round of 2 steps under torch.profiler: the top ops by device time and a time breakdown."""
    from torch.profiler import ProfilerActivity, profile

    two_steps = argparse.Namespace(**{**vars(args), "steps": 2})
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if placement.cuda else [])

    def profiled():
        with profile(activities=activities) as prof:
            stats = run_round(method, model, trainable, rows, two_steps, placement, move=False)
        return prof, stats

    prof, stats = placement.call(profiled, model)
    events = prof.key_averages()
    self_time = "self_device_time_total" if placement.cuda else "self_cpu_time_total"
    table = events.table(sort_by=self_time, row_limit=top)
    ops, breakdown = _op_times(events, self_time, placement.cuda)
    total = sum(breakdown.values())
    return {"wall_s_per_step": stats.seconds / stats.steps, "device_ms_per_step": total / 1e3 / stats.steps,
            "breakdown_ms_per_step": {k: v / 1e3 / stats.steps
                                      for k, v in sorted(breakdown.items(), key=lambda x: -x[1])},
            "top_ops_ms_per_step": [(k[:120], t / 1e3 / stats.steps) for k, t in ops[:top]], "table": table,
            "peak_mb": stats.peak_memory_mb}


def _op_times(events, self_time: str, cuda: bool) -> tuple[list[tuple[str, float]], dict[str, float]]:
    """(op, self time) by descending time, and the time per OP_KINDS kind, in microseconds.

    GPU: the kernels themselves (each once; the aten ops that launch them are not counted again).
    CPU: every op's self time.
    """
    breakdown: dict[str, float] = {}
    ops = []
    for e in events:
        if cuda and (e.device_type != torch.autograd.DeviceType.CUDA or e.key.startswith("Optimizer.")):
            continue  # kernels only; "Optimizer.step#AdamW.step" is an annotation spanning its kernels
        t = getattr(e, self_time, 0.0) or 0.0
        if t <= 0 or e.key.startswith("ProfilerStep"):
            continue
        ops.append((e.key, t))
        name = e.key.lower()
        kind = next((k for k, keys in OP_KINDS.items() if any(x in name for x in keys)),
                    "other (elementwise, norms, ...)")
        breakdown[kind] = breakdown.get(kind, 0.0) + t
    ops.sort(key=lambda x: -x[1])
    return ops, breakdown


def optimizer_seconds(model, trainable, placement: Placement, reps: int = 3) -> float:
    """Median seconds of what train_local does per step besides forward/backward: grad clipping + AdamW step."""
    params = freeze_except(model, trainable)
    placement.enter(model)
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    optimizer.step()  # allocates the state
    times = []
    for _ in range(reps):
        if placement.cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        if placement.cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    for p in params:
        p.grad = None
        p.requires_grad_(False)
    placement.leave(model)
    return statistics.median(times)


# ---------------------------------------------------------------- memory ----------------------------------------
def tensor_memory(model, trainable, rows, args, method) -> dict[str, float]:
    """Bytes held at the start of backward: params, grads, AdamW state, saved activations."""
    params = dict(model.named_parameters())
    param_bytes = sum(p.numel() * p.element_size() for p in {id(p): p for p in params.values()}.values())
    train_params = [params[n] for n in trainable]
    grad_bytes = sum(p.numel() * p.element_size() for p in train_params)
    optim_bytes = 2 * grad_bytes  # AdamW exp_avg + exp_avg_sq (same dtype as the parameter)
    param_ptrs = {p.untyped_storage().data_ptr() for p in params.values()}
    saved: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in param_ptrs:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    from fl_offsite.data.encode import collate

    batch = collate(rows[:args.batch], 0)
    batch = {k: v.to(next(model.parameters()).device) for k, v in batch.items()}
    freeze_except(model, trainable)
    model.train()
    loss_fn = full_logits_loss if method.startswith("offsite-head") else train_mod.answer_loss
    autocast = torch.autocast(batch["input_ids"].device.type, dtype=torch.bfloat16) \
        if precision_of(method, args) == "bf16" else torch.autocast("cpu", enabled=False)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast:
        loss = loss_fn(model, batch)
    act_bytes = sum(saved.values())
    del loss
    model.eval()
    for p in params.values():
        p.requires_grad_(False)
    mb = 2 ** 20
    return {"weights_mb": param_bytes / mb, "grads_mb": grad_bytes / mb, "optimizer_mb": optim_bytes / mb,
            "activations_mb": act_bytes / mb, "total_mb": (param_bytes + grad_bytes + optim_bytes + act_bytes) / mb}


def rss_child(method: str, args) -> dict[str, float]:
    """Run in a fresh process: build ``method``'s model alone, reset the peak RSS, train one round; RSS in MB."""
    torch.set_num_threads(args.threads)
    full = AutoModelForCausalLM.from_config(model_config(args.model), dtype=torch.float32)
    model, trainable = build(method, full, args)
    if precision_of(method, args) == "bf16":
        half_frozen(model, trainable)
    del full
    gc.collect()
    with contextlib.suppress(OSError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    rows = features(model.config.vocab_size, args.batch * args.steps, args.seq, args.answer)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = status_kb("VmRSS")
    run_round(method, model, trainable, rows, args, Placement(torch.device("cpu")))
    return {"rss_before_mb": base / 1024, "peak_rss_mb": status_kb("VmHWM") / 1024}


def measure_rss(method: str, args) -> dict[str, float] | None:
    """Peak RSS of ``rss_child`` in a fresh process, at this process's torch threads; None without Linux /proc."""
    if not Path("/proc/self/clear_refs").exists():
        return None
    child_args = argparse.Namespace(**{**vars(args), "threads": torch.get_num_threads()})
    return in_fresh_process(rss_child, method, child_args, env={"TQDM_DISABLE": "1"})


# ---------------------------------------------------------------- FLOPs -----------------------------------------
def flops_per_row(model, trainable: set[str], seq: int, answer: int, head_all: bool = False) -> dict[str, float]:
    """Training FLOPs for one row of ``seq`` tokens (multiply-add = 2 FLOPs).

    Forward: 2 x (matrix params) per token for every block present, plus attention scores
    (QK^T and AV: 2 x seq x d_attn per token per block, Kaplan et al.'s causal average), plus
    the LM head (2 x vocab x hidden) at each position it is applied to (the labelled ones with
    logits_to_keep; all of them without). Backward, per linear map: 2 x params per token for
    the gradient of its input, needed when anything below it trains; 2 x params per token for
    the gradient of its weight, only when it trains. Attention scores have no weights: their
    backward is 2 x forward when input grads are needed. Blocks below the lowest trainable
    parameter have no backward at all; neither do embedding lookups (counted as zero FLOPs).
    LoRA factors are linear maps like any other (trainable). Norm and elementwise ops are ignored.
    """
    prefix, blocks = find_blocks(model)
    cfg = model.config.get_text_config()
    hidden = cfg.hidden_size
    heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or hidden // heads
    d_attn = heads * head_dim
    names = {p: n for n, p in model.named_parameters()}
    block_of = {}
    for i, block in enumerate(blocks):
        for p in block.parameters():
            block_of[id(p)] = i
    lowest = min((block_of[id(p)] for p in model.parameters() if names[p] in trainable and id(p) in block_of),
                 default=0)
    head = model.get_output_embeddings().weight
    head_trains = names[head] in trainable
    if any(names[p] in trainable and id(p) not in block_of and p is not head for p in model.parameters()):
        lowest = 0  # embeddings train (full fine-tuning): everything above needs input grads
    positions = seq - 1 if (head_all or answer == 0) else answer
    fwd = bwd = 0.0
    for i, block in enumerate(blocks):
        att = 2 * seq * d_attn * seq  # per row
        for p in block.parameters():
            if p.dim() < 2:
                continue
            f = 2 * p.numel() * seq
            fwd += f
            if i >= lowest:
                bwd += f  # input grads (approximately: the very first op of the lowest block needs none)
                if names[p] in trainable:
                    bwd += f
        fwd += att
        if i >= lowest:
            bwd += 2 * att
    head_f = 2 * head.numel() * positions
    fwd += head_f
    bwd += head_f * (1 + head_trains)
    return {"forward": fwd, "backward": bwd, "total": fwd + bwd}


# ---------------------------------------------------------------- parse -----------------------------------------
def parse_args(argv=None) -> argparse.Namespace:
    """The command line, the protocol's defaults filled in; ``methods`` becomes a list."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m", help="smollm2-135m, gpt2-xl, opt-1.3b, tiny, or a folder")
    parser.add_argument("--protocol", choices=PROTOCOLS, default="cpu")
    parser.add_argument("--split", help="l-k-r, e.g. 2-8-2 (default per model)")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--batch", type=int)
    parser.add_argument("--seq", type=int)
    parser.add_argument("--answer", type=int, help="labelled tokens at the end of each row; 0 = all (LM)")
    parser.add_argument("--steps", type=int, help="optimizer steps per timed round")
    parser.add_argument("--rounds", type=int, help="interleaved rounds (after one warm-up round)")
    parser.add_argument("--precision", choices=("fp32", "bf16"))
    parser.add_argument("--lora-r", type=int, default=4)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    parser.add_argument("--no-rss", action="store_true", help="skip the per-method subprocesses (CPU peak RSS)")
    parser.add_argument("--flops-only", action="store_true", help="print the FLOP model only (no training)")
    parser.add_argument("--profile", nargs="?", const="all", default="",
                        help="after the timed rounds, profile 2 steps of these methods (default: all; torch.profiler)")
    parser.add_argument("--resident", action="store_true",
                        help="GPU: keep every model on the GPU (no transfers between rounds; peaks net of the others)")
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args(argv)
    for key, value in PROTOCOLS[args.protocol].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.device == "cpu" and args.precision == "bf16" and args.protocol == "paper" and "--precision" not in \
            (argv or sys.argv):
        args.precision = "fp32"  # bf16 on CPU is fast only with AVX512-BF16 or AMX: ask for it with --precision
    args.methods = [m for m in args.methods.split(",") if m]
    unknown = {m.partition("@")[0] for m in args.methods} - set(METHODS) | \
        {m for m in args.methods if m.partition("@")[2] not in ("", "fp32", "bf16")}
    if unknown:
        parser.error(f"unknown methods {sorted(unknown)}; choose from {METHODS}")
    return args


# ---------------------------------------------------------------- build -----------------------------------------
def build_models(args, placement: Placement) -> dict[str, tuple[torch.nn.Module, set[str]]]:
    """Each method's model (seed 0, random weights) and trainable names; on a GPU, parked unless resident."""
    torch.manual_seed(0)
    # --flops-only needs the structure only: build on the meta device (no memory, any model size).
    # On a GPU the models are built there (random init of 1.5B parameters takes a while on CPUs) and
    # then parked on the CPU: each method's round moves only its own model to the GPU.
    with torch.device("meta" if args.flops_only else placement.device):
        full = AutoModelForCausalLM.from_config(model_config(args.model), dtype=torch.float32)
        models = {}
        for method in args.methods:
            model, trainable = build(method, full, args)
            if precision_of(method, args) == "bf16" and not args.flops_only:
                half_frozen(model, trainable)
            if not args.flops_only:
                placement.leave(model)
            models[method] = (model, trainable)
    del full
    gc.collect()
    if placement.cuda:
        torch.cuda.empty_cache()
    return models


def build_rows(models, args) -> list[dict[str, list[int]]]:
    """The random training rows of one round (none for --flops-only)."""
    if args.flops_only:
        return []
    vocab = next(iter(models.values()))[0].config.get_text_config().vocab_size
    return features(vocab, args.batch * args.steps, args.seq, args.answer)


# ---------------------------------------------------------------- measure ---------------------------------------
@dataclass
class Measurements:
    """What the benchmark measures, each a dict keyed by method; the training ones stay empty for --flops-only."""

    params: dict[str, tuple[int, int]]  # all parameters, trainable ones
    flops: dict[str, dict[str, float]]
    times: dict[str, list[float]] = field(default_factory=dict)  # seconds per step, one per round
    tps: dict[str, list[float]] = field(default_factory=dict)  # tokens per second, one per round
    mem: dict[str, dict[str, float]] = field(default_factory=dict)  # tensor_memory
    peak: dict | None = None  # the GPU allocator's peak MB, or the CPU peak RSS (measure_rss); None: not measured
    optim: dict[str, float] = field(default_factory=dict)  # clip + AdamW seconds per step
    profiles: dict[str, dict] = field(default_factory=dict)


def measure_structure(models, args) -> Measurements:
    """Parameter counts and FLOPs per row: no training needed."""
    flops = {m: flops_per_row(model, trainable, args.seq, args.answer, head_all=m.startswith("offsite-head"))
             for m, (model, trainable) in models.items()}
    params = {m: (sum(p.numel() for p in {id(p): p for p in model.parameters()}.values()),
                  sum(p.numel() for n, p in model.named_parameters() if n in trainable))
              for m, (model, trainable) in models.items()}
    return Measurements(params, flops)


def measure_training(models, rows, args, placement: Placement, measured: Measurements) -> None:
    """Tensor memory, the interleaved timed rounds, the optimizer's share and the peaks, into ``measured``."""
    measured.mem = {m: placement.call(tensor_memory, model, model, trainable, rows, args, m)
                    for m, (model, trainable) in models.items()}
    gpu_peak = measure_rounds(models, rows, args, placement, measured)
    measured.optim = {m: optimizer_seconds(*models[m], placement) for m in args.methods}
    rss = None
    if placement.device.type == "cpu" and not args.no_rss:
        rss = {m: measure_rss(m, args) for m in args.methods}
    measured.peak = gpu_peak or rss


def measure_rounds(models, rows, args, placement: Placement, measured: Measurements) -> dict[str, float]:
    """``args.rounds`` timed rounds after a warm-up, the methods in alternating order; the GPU peaks (MB)."""
    methods = args.methods
    measured.times = {m: [] for m in methods}
    measured.tps = {m: [] for m in methods}
    gpu_peak: dict[str, float] = {}
    last: dict[str, float] = {}
    for rnd in range(args.rounds + 1):  # round 0 warms up (allocator, kernels) and is not counted
        for method in (methods if rnd % 2 else methods[::-1]):  # A B C D, D C B A, ...: drift falls on all
            model, trainable = models[method]
            others = placement.others_bytes(model)  # not this method's memory
            stats = run_round(method, model, trainable, rows, args, placement)
            if rnd:
                measured.times[method].append(stats.seconds / stats.steps)
                measured.tps[method].append(stats.tokens_per_s)
                if placement.cuda:
                    peak = stats.peak_memory_mb - others / 2**20
                    gpu_peak[method] = max(gpu_peak.get(method, 0.0), peak)
            last[method] = stats.seconds / stats.steps
        print(f"  round {rnd}{' (warm-up, not counted)' if rnd == 0 else ''}: " +
              ", ".join(f"{m} {last[m]:.2f}" for m in methods) + " s/step", flush=True)
    return gpu_peak


def measure_profiles(models, rows, args, placement: Placement) -> dict[str, dict]:
    """``profile_step`` of the methods --profile names, each printed as it finishes."""
    profiles = {}
    for m in [m for m in args.methods if args.profile == "all" or m in args.profile.split(",")]:
        p = profiles[m] = profile_step(m, *models[m], rows, args, placement)
        p["peak_mb"] -= placement.others_bytes(models[m][0]) / 2**20
        print(f"profile {m}: {p['wall_s_per_step'] * 1e3:.1f} ms/step wall, {p['device_ms_per_step']:.1f} ms/step "
              f"of {'GPU kernels' if placement.cuda else 'CPU ops'}: " +
              ", ".join(f"{k} {v:.1f}" for k, v in p["breakdown_ms_per_step"].items()), flush=True)
        print(p["table"], flush=True)
    return profiles


# ---------------------------------------------------------------- report ----------------------------------------
def print_header(args, split: str, placement: Placement, seconds: float) -> None:
    device = placement.device
    print(f"model {args.model} (random weights), split {split}, protocol {args.protocol}: batch {args.batch} x "
          f"{args.seq} tokens, loss on {'every token' if args.answer == 0 else f'the last {args.answer} tokens'}, "
          f"{args.precision}, {args.steps} steps/round, {args.rounds} rounds, device {device}"
          f"{'' if placement.cuda else f' ({os.cpu_count()} CPUs, {torch.get_num_threads()} threads)'}; "
          f"built in {seconds:.0f} s")


def note_of(placement: Placement) -> str:
    """How the timings were taken, printed under the table and kept in the JSON."""
    if placement.cuda:
        return (f"Timings interleaved round by round (alternating order) on "
                f"{torch.cuda.get_device_name(placement.device)}, medians over rounds; " +
                ("each method's model alone on the GPU during its round." if placement.park else
                 "every model resident on the GPU, peaks net of the other models' bytes."))
    return ("Timings interleaved round by round (alternating order) on a machine shared with other jobs; "
            "medians over rounds. Absolute numbers are noisy, the ratios much less so.")


def result_json(args, split: str, placement: Placement, note: str, measured: Measurements) -> dict:
    device = placement.device
    return {"model": args.model, "split": split, "protocol": args.protocol, "batch": args.batch,
            "seq": args.seq, "answer": args.answer, "precision": args.precision, "steps": args.steps,
            "rounds": args.rounds, "device": str(device), "resident": not placement.park, "cpus": os.cpu_count(),
            "threads": torch.get_num_threads(), "machine": platform.platform(), "note": note,
            "gpu": torch.cuda.get_device_name(device) if placement.cuda else None,
            "torch": torch.__version__,
            "methods": {m: {"params": measured.params[m][0], "trainable": measured.params[m][1],
                            "flops_per_row": measured.flops[m], "seconds_per_step": measured.times[m],
                            "tokens_per_s": measured.tps[m], "tensor_memory": measured.mem[m],
                            "peak": (measured.peak or {}).get(m), "clip_adamw_s": measured.optim[m]}
                        for m in args.methods},
            "profiles": {m: {k: v for k, v in p.items() if k != "table"} for m, p in measured.profiles.items()}}


def write(path: str | None, result: dict) -> None:
    if not path:
        return
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(result, indent=2))
    print(f"wrote {path}", flush=True)


# ---------------------------------------------------------------- main ------------------------------------------
def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    placement = Placement(torch.device(args.device), park=not args.resident)
    t0 = time.perf_counter()
    models = build_models(args, placement)
    rows = build_rows(models, args)
    split = "-".join(str(x) for x in _split_name(models, args))
    measured = measure_structure(models, args)
    print_header(args, split, placement, time.perf_counter() - t0)
    if args.flops_only:
        print_table(args.methods, measured)
        return 0
    measure_training(models, rows, args, placement, measured)
    print_table(args.methods, measured)
    note = note_of(placement)
    print(note)
    # written before the profile too, so that the measurements survive a timeout there
    write(args.out, result_json(args, split, placement, note, measured))
    if args.profile:
        measured.profiles = measure_profiles(models, rows, args, placement)
        write(args.out, result_json(args, split, placement, note, measured))
    return 0


def _split_name(models, args):
    bottom, top, k, drop = split_args(args)
    for method, (model, _) in models.items():
        if method.startswith("offsite"):
            return bottom, len(find_blocks(model)[1]) - bottom - top, top
    return bottom, (k if k is not None else f"drop{drop}"), top


def print_table(methods: list[str], measured: Measurements) -> None:
    """The per-method table (structure only for --flops-only) and the tensor memory's parts."""
    params, flops, times, tps = measured.params, measured.flops, measured.times, measured.tps
    mem, peak, optim = measured.mem, measured.peak, measured.optim
    base = "full" if "full" in methods else methods[0]
    head = ["method", "params", "trainable", "GFLOP/row", "FLOP speed-up limit"]
    if times:
        head += ["s/step", "tokens/s", "speed-up", "% of limit", "clip+AdamW s", "speed-up w/o it",
                 "tensor MB", "mem vs full"]
        if peak:
            head += ["peak MB", "peak vs full"]
    rows = []
    for m in methods:
        limit = flops[base]["total"] / flops[m]["total"]
        row = [m, f"{params[m][0] / 1e6:.1f}M", f"{params[m][1] / 1e6:.2f}M", f"{flops[m]['total'] / 1e9:.1f}",
               f"{limit:.2f}x"]
        if times:
            step = statistics.median(times[m])
            speed = statistics.median(times[base]) / step
            compute = (statistics.median(times[base]) - optim[base]) / max(step - optim[m], 1e-9)
            row += [f"{step:.3f}", f"{statistics.median(tps[m]):.0f}", f"{speed:.2f}x", f"{100 * speed / limit:.0f}%",
                    f"{optim[m]:.3f}", f"{compute:.2f}x", f"{mem[m]['total_mb']:.0f}",
                    f"{mem[m]['total_mb'] / mem[base]['total_mb']:.3f}"]
            if peak:
                p = peak[m] if isinstance(peak[m], float) else peak[m]["peak_rss_mb"]
                b = peak[base] if isinstance(peak[base], float) else peak[base]["peak_rss_mb"]
                row += [f"{p:.0f}", f"{p / b:.3f}"]
        rows.append(row)
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows, strict=True)]
    print("| " + " | ".join(h.ljust(w) for h, w in zip(head, widths, strict=True)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in rows:
        print("| " + " | ".join(str(x).ljust(w) for x, w in zip(row, widths, strict=True)) + " |")
    if mem:
        print("tensor memory (MB): " + "; ".join(
            f"{m}: weights {mem[m]['weights_mb']:.0f} + grads {mem[m]['grads_mb']:.0f} + AdamW "
            f"{mem[m]['optimizer_mb']:.0f} + activations {mem[m]['activations_mb']:.0f}" for m in methods))


if __name__ == "__main__":
    sys.exit(main())
