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
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from fl_offsite.surgery.blocks import find_blocks
from fl_offsite.surgery.lora import LoraSpec, add_lora, lora_blocks, lora_names
from fl_offsite.surgery.split import adapter_names, build_emulator, plan_split
import fl_offsite.learn.train as train_mod
from fl_offsite.learn.train import TrainSettings, freeze_except, half_frozen, train_local

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
# On a GPU each method's model is parked on the CPU between its rounds, so that the allocator's peak
# is that method's alone; --resident keeps every model on the GPU (no transfers, much faster) and
# subtracts the other models' resident bytes from the peak instead.
PARK = True
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


def to_gpu(model, device) -> None:
    if device.type == "cuda" and PARK:
        model.to(device)
        torch.cuda.empty_cache()


def park(model, device) -> None:
    if device.type == "cuda" and PARK:
        model.to("cpu")
        torch.cuda.empty_cache()


def resident_bytes(model) -> int:
    """Bytes of the model's parameters and buffers (each storage once)."""
    tensors = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
               for t in [*model.parameters(), *model.buffers()]}
    return sum(tensors.values())


def run_round(method: str, model, trainable, rows, args, device, move: bool = True) -> train_mod.TrainStats:
    """One round of ``args.steps`` steps; on a GPU the model goes there for the round and back (``move``)."""
    settings = TrainSettings(lr=1e-5, batch_size=args.batch, local_steps=args.steps,
                             precision=precision_of(method, args))
    original = train_mod.answer_loss
    if method.startswith("offsite-head"):
        train_mod.answer_loss = full_logits_loss
    try:
        if move:
            to_gpu(model, device)
        if device.type == "cuda":
            torch.cuda.synchronize()
        stats = train_local(model, trainable, rows, settings, pad_id=0, desc=method)
        if device.type == "cuda":
            torch.cuda.synchronize()
        for param in model.parameters():
            param.grad = None  # train_local leaves the last step's gradients
        if move:
            park(model, device)
        return stats
    finally:
        train_mod.answer_loss = original


def on_device(fn, model, device, *args):
    """``fn(*args)`` with ``model`` moved to ``device`` for the call (a CUDA device; the CPU: as is)."""
    to_gpu(model, device)
    try:
        return fn(*args)
    finally:
        park(model, device)


def profile_step(method: str, model, trainable, rows, args, device, top: int = 15) -> dict:
    """One round of 2 steps under torch.profiler: the top ops by device time and a time breakdown."""
    from torch.profiler import ProfilerActivity, profile

    saved = args.steps
    args.steps = 2
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])

    def profiled():
        with profile(activities=activities) as prof:
            stats = run_round(method, model, trainable, rows, args, device, move=False)
        return prof, stats

    try:
        prof, stats = on_device(profiled, model, device)
    finally:
        args.steps = saved
    events = prof.key_averages()
    cuda = device.type == "cuda"
    self_time = "self_device_time_total" if cuda else "self_cpu_time_total"
    table = events.table(sort_by=self_time, row_limit=top)
    # GPU: the kernels themselves (each once; the aten ops that launch them are not counted again).
    # CPU: every op's self time.
    kinds = {"log-softmax / cross-entropy": ("softmax", "nll_loss", "cunn_spatial"),
             "matmul": ("gemm", "cutlass", "xmma", "nvjet", "sm90_", "aten::mm", "aten::addmm", "aten::bmm"),
             "attention": ("flash", "fmha", "attention", "sdpa"),
             "optimizer (AdamW, clip)": ("multi_tensor", "adam", "_foreach"),
             "copies / casts": ("memcpy", "memset", "copy", "aten::to", "aten::cat"),
             }
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
        kind = next((k for k, keys in kinds.items() if any(x in name for x in keys)), "other (elementwise, norms, ...)")
        breakdown[kind] = breakdown.get(kind, 0.0) + t
    ops.sort(key=lambda x: -x[1])
    total = sum(breakdown.values())
    return {"wall_s_per_step": stats.seconds / stats.steps, "device_ms_per_step": total / 1e3 / stats.steps,
            "breakdown_ms_per_step": {k: v / 1e3 / stats.steps for k, v in sorted(breakdown.items(), key=lambda x: -x[1])},
            "top_ops_ms_per_step": [(k[:120], t / 1e3 / stats.steps) for k, t in ops[:top]], "table": table,
            "peak_mb": stats.peak_memory_mb}


def optimizer_seconds(model, trainable, device, reps: int = 3) -> float:
    """Median seconds of what train_local does per step besides forward/backward: grad clipping + AdamW step."""
    params = freeze_except(model, trainable)
    to_gpu(model, device)
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    optimizer.step()  # allocates the state
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    for p in params:
        p.grad = None
        p.requires_grad_(False)
    park(model, device)
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
    run_round(method, model, trainable, rows, args, torch.device("cpu"))
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
    heads = getattr(cfg, "num_attention_heads")
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


# ---------------------------------------------------------------- main ------------------------------------------
def main(argv=None) -> int:
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
    if args.threads:
        torch.set_num_threads(args.threads)
    global PARK
    PARK = not args.resident
    methods = [m for m in args.methods.split(",") if m]
    unknown = {m.partition("@")[0] for m in methods} - set(METHODS) | \
        {m for m in methods if m.partition("@")[2] not in ("", "fp32", "bf16")}
    if unknown:
        parser.error(f"unknown methods {sorted(unknown)}; choose from {METHODS}")
    device = torch.device(args.device)

    torch.manual_seed(0)
    t0 = time.perf_counter()
    # --flops-only needs the structure only: build on the meta device (no memory, any model size).
    # On a GPU the models are built there (random init of 1.5B parameters takes a while on CPUs) and
    # then parked on the CPU: each method's round moves only its own model to the GPU.
    build_device = "meta" if args.flops_only else device
    with torch.device(build_device):
        full = AutoModelForCausalLM.from_config(model_config(args.model), dtype=torch.float32)
        models = {}
        for method in methods:
            model, trainable = build(method, full, args)
            if precision_of(method, args) == "bf16" and not args.flops_only:
                half_frozen(model, trainable)
            if device.type == "cuda" and not args.flops_only:
                park(model, device)
            models[method] = (model, trainable)
    del full
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    vocab = next(iter(models.values()))[0].config.get_text_config().vocab_size
    rows = [] if args.flops_only else features(vocab, args.batch * args.steps, args.seq, args.answer)
    split = "-".join(str(x) for x in _split_name(models, args))

    flops = {m: flops_per_row(model, trainable, args.seq, args.answer, head_all=m.startswith("offsite-head"))
             for m, (model, trainable) in models.items()}
    params = {m: (sum(p.numel() for p in {id(p): p for p in model.parameters()}.values()),
                  sum(p.numel() for n, p in model.named_parameters() if n in trainable))
              for m, (model, trainable) in models.items()}
    print(f"model {args.model} (random weights), split {split}, protocol {args.protocol}: batch {args.batch} x "
          f"{args.seq} tokens, loss on {'every token' if args.answer == 0 else f'the last {args.answer} tokens'}, "
          f"{args.precision}, {args.steps} steps/round, {args.rounds} rounds, device {device}"
          f"{'' if device.type == 'cuda' else f' ({os.cpu_count()} CPUs, {torch.get_num_threads()} threads)'}; "
          f"built in {time.perf_counter() - t0:.0f} s")
    if args.flops_only:
        _print_table(methods, params, flops, None, None, None, None, None)
        return 0

    mem = {m: on_device(tensor_memory, model, device, model, trainable, rows, args, m)
           for m, (model, trainable) in models.items()}
    times: dict[str, list[float]] = {m: [] for m in methods}
    tps: dict[str, list[float]] = {m: [] for m in methods}
    gpu_peak: dict[str, float] = {}
    last: dict[str, float] = {}
    for rnd in range(args.rounds + 1):  # round 0 warms up (allocator, kernels) and is not counted
        for method in (methods if rnd % 2 else methods[::-1]):  # A B C D, D C B A, ...: drift falls on all
            model, trainable = models[method]
            # the other models' bytes on the GPU (none unless --resident): not this method's memory
            others = torch.cuda.memory_allocated(device) - resident_bytes(model) * (not PARK) \
                if device.type == "cuda" else 0
            stats = run_round(method, model, trainable, rows, args, device)
            if rnd:
                times[method].append(stats.seconds / stats.steps)
                tps[method].append(stats.tokens_per_s)
                if device.type == "cuda":
                    peak = stats.peak_memory_mb - others / 2**20
                    gpu_peak[method] = max(gpu_peak.get(method, 0.0), peak)
            last[method] = stats.seconds / stats.steps
        print(f"  round {rnd}{' (warm-up, not counted)' if rnd == 0 else ''}: " +
              ", ".join(f"{m} {last[m]:.2f}" for m in methods) + " s/step", flush=True)
    optim = {m: optimizer_seconds(*models[m], device) for m in methods}
    rss = None
    if device.type == "cpu" and not args.no_rss:
        rss = {m: measure_rss(m, args) for m in methods}
    _print_table(methods, params, flops, times, tps, mem, gpu_peak or rss, optim)
    if device.type == "cuda":
        note = (f"Timings interleaved round by round (alternating order) on {torch.cuda.get_device_name(device)}, "
                "medians over rounds; " + ("each method's model alone on the GPU during its round." if PARK else
                                           "every model resident on the GPU, peaks net of the other models' bytes."))
    else:
        note = ("Timings interleaved round by round (alternating order) on a machine shared with other jobs; "
                "medians over rounds. Absolute numbers are noisy, the ratios much less so.")
    print(note)
    profiles: dict[str, dict] = {}

    def write() -> None:
        if not args.out:
            return
        result = {"model": args.model, "split": split, "protocol": args.protocol, "batch": args.batch,
                  "seq": args.seq, "answer": args.answer, "precision": args.precision, "steps": args.steps,
                  "rounds": args.rounds, "device": str(device), "resident": not PARK, "cpus": os.cpu_count(),
                  "threads": torch.get_num_threads(), "machine": platform.platform(), "note": note,
                  "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
                  "torch": torch.__version__,
                  "methods": {m: {"params": params[m][0], "trainable": params[m][1], "flops_per_row": flops[m],
                                  "seconds_per_step": times[m], "tokens_per_s": tps[m],
                                  "tensor_memory": mem[m], "peak": (gpu_peak or rss or {}).get(m),
                                  "clip_adamw_s": optim[m]}
                              for m in methods},
                  "profiles": {m: {k: v for k, v in p.items() if k != "table"} for m, p in profiles.items()}}
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2))
        print(f"wrote {args.out}", flush=True)

    write()  # before the profile, so that the measurements survive a timeout there
    if args.profile:
        for m in [m for m in methods if args.profile == "all" or m in args.profile.split(",")]:
            profiles[m] = profile_step(m, *models[m], rows, args, device)
            p = profiles[m]
            p["peak_mb"] -= (torch.cuda.memory_allocated(device) - resident_bytes(models[m][0]) * (not PARK)) / 2**20 \
                if device.type == "cuda" else 0
            print(f"profile {m}: {p['wall_s_per_step'] * 1e3:.1f} ms/step wall, {p['device_ms_per_step']:.1f} ms/step "
                  f"of {'GPU kernels' if device.type == 'cuda' else 'CPU ops'}: " +
                  ", ".join(f"{k} {v:.1f}" for k, v in p["breakdown_ms_per_step"].items()), flush=True)
            print(p["table"], flush=True)
        write()
    return 0


def _split_name(models, args):
    bottom, top, k, drop = split_args(args)
    for method, (model, _) in models.items():
        if method.startswith("offsite"):
            return bottom, len(find_blocks(model)[1]) - bottom - top, top
    return bottom, (k if k is not None else f"drop{drop}"), top


def _print_table(methods, params, flops, times, tps, mem, peak, optim) -> None:
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
                    f"{optim[m]:.3f}", f"{compute:.2f}x", f"{mem[m]['total_mb']:.0f}", f"{mem[m]['total_mb'] / mem[base]['total_mb']:.3f}"]
            if peak:
                p = peak[m] if isinstance(peak[m], float) else peak[m]["peak_rss_mb"]
                b = peak[base] if isinstance(peak[base], float) else peak[base]["peak_rss_mb"]
                row += [f"{p:.0f}", f"{p / b:.3f}"]
        rows.append(row)
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    print("| " + " | ".join(h.ljust(w) for h, w in zip(head, widths)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in rows:
        print("| " + " | ".join(str(x).ljust(w) for x, w in zip(row, widths)) + " |")
    if mem:
        print("tensor memory (MB): " + "; ".join(
            f"{m}: weights {mem[m]['weights_mb']:.0f} + grads {mem[m]['grads_mb']:.0f} + AdamW "
            f"{mem[m]['optimizer_mb']:.0f} + activations {mem[m]['activations_mb']:.0f}" for m in methods))


if __name__ == "__main__":
    sys.exit(main())
