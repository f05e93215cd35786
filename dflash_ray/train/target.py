"""Train the tiny Qwen3-MoE demo target on the standard-library corpus, on CPU.

Owns the target's architecture choice, the training loop (random windows over the concatenated
training split, AdamW, warmup + cosine, grad clip), periodic held-out evaluation, resumable
checkpoints and the final Hugging Face directory that the engine and `AutoModelForCausalLM` load.

Work dir layout (`--out`):
    tokenizer/        built here first if `--tokenizer` is not given
    ckpt.pt           model + optimizer + step + RNG state + log; a rerun resumes from it
    model/            final HF directory (bf16 safetensors, config, generation config, tokenizer)
    train_log.json    per-interval train loss, held-out loss, tok/s, wall time; greedy samples
    loss.png          loss curves

Schedule: the cosine runs over "progress" = max(step / --steps, train_seconds / --minutes), so the
learning rate reaches its floor whichever budget runs out first, and training stops there. Train
seconds accumulate across resumes (stored in the checkpoint). With only `--steps` the run is fully
deterministic, and a resumed run continues bit-for-bit from its last checkpoint.

On a shared CPU box run with `OMP_WAIT_POLICY=PASSIVE` (scripts/make_demo_pair.sh sets it):
spinning OpenMP workers waiting for a descheduled peer cut throughput several-fold.

    OMP_WAIT_POLICY=PASSIVE python -m dflash_ray.train.target --out build/x/target --minutes 55
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from .bpe import EOS, build_tokenizer
from .corpus import heldout_prompts, split_files


@dataclass
class TrainArgs:
    out: str
    tokenizer: str | None = None
    minutes: float | None = None
    steps: int | None = None
    max_files: int | None = None  # first N files of each split only: quick runs and tests
    # Architecture (Qwen3-MoE).
    layers: int = 4
    hidden: int = 192
    heads: int = 4
    kv_heads: int = 2
    head_dim: int = 48
    experts: int = 8
    top_k: int = 2
    moe_intermediate: int = 320
    # Optimization.
    seq_len: int = 384
    batch: int = 8
    lr: float = 2e-3
    min_lr_ratio: float = 0.05
    warmup: int = 200
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    seed: int = 0
    threads: int = 2
    # Bookkeeping.
    eval_minutes: float = 5.0
    eval_tokens: int = 32_768
    ckpt_minutes: float = 3.0
    ckpt_steps: int = 0  # also checkpoint every N steps (0: time-based only)
    log_steps: int = 25
    samples: int = 2
    sample_tokens: int = 96


def build_config(args: TrainArgs, vocab_size: int, eos_id: int):
    from transformers import Qwen3MoeConfig

    return Qwen3MoeConfig(
        vocab_size=vocab_size,
        hidden_size=args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        head_dim=args.head_dim,
        num_experts=args.experts,
        num_experts_per_tok=args.top_k,
        moe_intermediate_size=args.moe_intermediate,
        # Every layer sparse: the point of the demo target is to exercise the MoE path.
        decoder_sparse_step=1,
        mlp_only_layers=[],
        norm_topk_prob=True,
        intermediate_size=args.moe_intermediate * args.top_k,
        max_position_embeddings=2048,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=eos_id,
        pad_token_id=eos_id,
        router_aux_loss_coef=0.01,
    )


def load_token_stream(tokenizer, files) -> torch.Tensor:
    """All files tokenized and joined with `<|endoftext|>` (after each file), as int32."""
    from .corpus import read_text

    eos_id = tokenizer.convert_tokens_to_ids(EOS)
    texts = [read_text(p) for p in files]
    ids: list[int] = []
    for enc in tokenizer(texts, add_special_tokens=False)["input_ids"]:
        ids.extend(enc)
        ids.append(eos_id)
    return torch.tensor(ids, dtype=torch.int32)


def lr_at(args: TrainArgs, step: int, progress: float) -> float:
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    floor = args.lr * args.min_lr_ratio
    return floor + 0.5 * (args.lr - floor) * (1 + math.cos(math.pi * min(progress, 1.0)))


def progress_of(args: TrainArgs, step: int, seconds: float) -> float:
    fracs = []
    if args.steps:
        fracs.append(step / args.steps)
    if args.minutes:
        fracs.append(seconds / (args.minutes * 60))
    return max(fracs)


def sample_batch(
    stream: torch.Tensor, batch: int, seq_len: int, gen: torch.Generator
) -> torch.Tensor:
    starts = torch.randint(0, len(stream) - seq_len, (batch,), generator=gen)
    return torch.stack([stream[s : s + seq_len] for s in starts.tolist()]).long()


def lm_loss(model, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss to optimize incl. router load-balancing, plain next-token cross-entropy)."""
    out = model(input_ids=ids, labels=ids, output_router_logits=True, use_cache=False)
    ce = out.loss - model.router_aux_loss_coef * out.aux_loss
    return out.loss, ce.detach()


@torch.no_grad()
def evaluate(model, windows: torch.Tensor, batch: int) -> float:
    model.eval()
    losses = [
        model(
            input_ids=windows[i : i + batch], labels=windows[i : i + batch], use_cache=False
        ).loss.item()
        for i in range(0, len(windows), batch)
    ]
    model.train()
    return sum(losses) / len(losses)


def eval_windows(stream: torch.Tensor, seq_len: int, max_tokens: int) -> torch.Tensor:
    """Fixed, non-overlapping windows spread evenly over the whole held-out stream, so every
    held-out module is represented, not just the first few."""
    n_all = len(stream) // seq_len
    n = max(1, min(n_all, max_tokens // seq_len))
    idx = torch.linspace(0, n_all - 1, n).long()
    return stream[: n_all * seq_len].view(n_all, seq_len)[idx].long()


def save_checkpoint(path: Path, state: dict) -> None:
    # Write-then-rename: a kill during the save never leaves a truncated checkpoint behind.
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def plot_losses(log: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    tr = [r for r in log if "train_loss" in r]
    ev = [r for r in log if "heldout_loss" in r]
    ax.plot([r["step"] for r in tr], [r["train_loss"] for r in tr], label="train")
    ax.plot([r["step"] for r in ev], [r["heldout_loss"] for r in ev], "o-", label="held-out")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def export_model(model, tok_dir: Path, model_dir: Path, eos_id: int) -> None:
    from transformers import GenerationConfig

    model_dir.mkdir(parents=True, exist_ok=True)
    model.generation_config = GenerationConfig(
        eos_token_id=eos_id, pad_token_id=eos_id, bos_token_id=None, do_sample=False
    )
    # Round-trip through a copy so the live fp32 model (and a later resume) is untouched.
    bf16 = type(model)(model.config)
    bf16.load_state_dict(model.state_dict())
    bf16.generation_config = model.generation_config
    bf16.to(torch.bfloat16).save_pretrained(model_dir)
    for f in tok_dir.iterdir():
        shutil.copy(f, model_dir / f.name)


def greedy_samples(model_dir: Path, n: int, max_new_tokens: int) -> list[dict]:
    """Greedy completions of held-out prompts from the exported directory (loaded back as-is), plus
    a repetition measure: the share of distinct token 4-grams in the completion (a model stuck in
    a loop scores near 0, varied text near 1)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    out = []
    for ids in heldout_prompts(tok, n, prompt_tokens=96, seed=0):
        gen = model.generate(torch.tensor([ids]), max_new_tokens=max_new_tokens, do_sample=False)
        new = gen[0, len(ids) :].tolist()
        grams = [tuple(new[i : i + 4]) for i in range(len(new) - 3)]
        out.append(
            {
                "prompt": tok.decode(ids),
                "completion": tok.decode(new),
                "distinct_4gram_ratio": len(set(grams)) / max(1, len(grams)),
            }
        )
    return out


def train(args: TrainArgs) -> Path:
    """Run (or resume) training in `args.out`; returns the exported model directory."""
    from transformers import AutoTokenizer, Qwen3MoeForCausalLM

    if not (args.minutes or args.steps):
        raise ValueError("give --minutes and/or --steps")
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tok_dir = Path(args.tokenizer) if args.tokenizer else out / "tokenizer"
    if not (tok_dir / "tokenizer.json").is_file():
        build_tokenizer(tok_dir)
    tok = AutoTokenizer.from_pretrained(tok_dir)
    eos_id = tok.convert_tokens_to_ids(EOS)

    train_files, heldout_files = split_files()
    train_files, heldout_files = train_files[: args.max_files], heldout_files[: args.max_files]
    train_stream = load_token_stream(tok, train_files)
    heldout = eval_windows(load_token_stream(tok, heldout_files), args.seq_len, args.eval_tokens)

    torch.manual_seed(args.seed)
    model = Qwen3MoeForCausalLM(build_config(args, len(tok), eos_id))
    model.train()
    n_params = sum(p.numel() for p in model.parameters())
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": args.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=args.lr,
        betas=(0.9, 0.95),
    )
    gen = torch.Generator().manual_seed(args.seed)
    step, seconds, log = 0, 0.0, []

    ckpt_path = out / "ckpt.pt"
    if ckpt_path.is_file():
        state = torch.load(ckpt_path, weights_only=False)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        gen.set_state(state["data_rng"])
        torch.set_rng_state(state["torch_rng"])
        step, seconds, log = state["step"], state["train_seconds"], state["log"]
        print(f"resumed from {ckpt_path} at step {step} ({seconds / 60:.1f} train-min)", flush=True)
    print(
        f"params {n_params / 1e6:.2f}M  train tokens {len(train_stream):,}  "
        f"held-out windows {len(heldout)}x{args.seq_len}",
        flush=True,
    )

    def checkpoint() -> None:
        save_checkpoint(
            ckpt_path,
            {
                "model": model.state_dict(),
                "optimizer": opt.state_dict(),
                "data_rng": gen.get_state(),
                "torch_rng": torch.get_rng_state(),
                "step": step,
                "train_seconds": seconds,
                "log": log,
                "args": asdict(args),
            },
        )

    tokens_per_step = args.batch * args.seq_len
    last_ckpt = last_eval = seconds
    if not log:
        log.append(
            {
                "step": 0,
                "heldout_loss": evaluate(model, heldout, args.batch),
                "wall_time": time.time(),
            }
        )
    bar = tqdm(total=args.steps, initial=step, mininterval=5, dynamic_ncols=True)
    window_loss, window_t, window_n = 0.0, 0.0, 0
    while progress_of(args, step, seconds) < 1.0:
        t0 = time.perf_counter()
        lr = lr_at(args, step, progress_of(args, step, seconds))
        for g in opt.param_groups:
            g["lr"] = lr
        loss, ce = lm_loss(model, sample_batch(train_stream, args.batch, args.seq_len, gen))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        opt.step()
        step += 1
        dt = time.perf_counter() - t0
        seconds += dt
        window_loss, window_t, window_n = window_loss + ce.item(), window_t + dt, window_n + 1
        bar.update(1)
        bar.set_postfix(
            loss=f"{ce.item():.3f}", tok_s=f"{tokens_per_step / dt:.0f}", lr=f"{lr:.1e}"
        )
        if step % args.log_steps == 0:
            log.append(
                {
                    "step": step,
                    "train_loss": window_loss / window_n,
                    "lr": lr,
                    "tok_s": window_n * tokens_per_step / window_t,
                    "train_seconds": seconds,
                    "wall_time": time.time(),
                }
            )
            window_loss, window_t, window_n = 0.0, 0.0, 0
        done = progress_of(args, step, seconds) >= 1.0
        if done or seconds - last_eval >= args.eval_minutes * 60:
            last_eval = seconds
            ho = evaluate(model, heldout, args.batch)
            log.append({"step": step, "heldout_loss": ho, "wall_time": time.time()})
            bar.write(f"step {step}: held-out loss {ho:.3f} ({seconds / 60:.1f} train-min)")
        if (
            done
            or seconds - last_ckpt >= args.ckpt_minutes * 60
            or (args.ckpt_steps and step % args.ckpt_steps == 0)
        ):
            last_ckpt = seconds
            checkpoint()
    bar.close()

    model_dir = out / "model"
    export_model(model, tok_dir, model_dir, eos_id)
    samples = greedy_samples(model_dir, args.samples, args.sample_tokens) if args.samples else []
    for s in samples:
        print(
            f"--- prompt (tail) ---\n{s['prompt'][-300:]}\n--- greedy completion "
            f"(distinct 4-gram ratio {s['distinct_4gram_ratio']:.2f}) ---\n{s['completion']}\n",
            flush=True,
        )
    result = {"params": n_params, "args": asdict(args), "log": log, "samples": samples}
    (out / "train_log.json").write_text(json.dumps(result, indent=1) + "\n")
    plot_losses(log, out / "loss.png")
    print(f"saved {model_dir}", flush=True)
    return model_dir


# Argument types of the TrainArgs fields that default to None (the others take their default's).
_OPTIONAL_TYPES = {"tokenizer": str, "minutes": float, "steps": int, "max_files": int}


def parse_args(argv: list[str] | None = None) -> TrainArgs:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    defaults = TrainArgs(out="")
    for name, value in asdict(defaults).items():
        flag = "--" + name.replace("_", "-")
        if name == "out":
            ap.add_argument(flag, required=True)
        elif value is None:
            ap.add_argument(flag, type=_OPTIONAL_TYPES[name])
        else:
            ap.add_argument(flag, type=type(value), default=value)
    return TrainArgs(**vars(ap.parse_args(argv)))


def main(argv: list[str] | None = None) -> None:
    train(parse_args(argv))


if __name__ == "__main__":
    main()
