"""`dflash-ray train-drafter`: regenerate data with the target, then train a DFlash drafter.

Resumable: the regenerated data and periodic checkpoints (weights, optimizer, step, RNG, log)
live in the `work` folder inside OUT; rerunning the same command continues. The result is a
z-lab-format drafter directory in OUT plus `train_log.json` and `train_curves.png`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import signal
import threading
import time
from dataclasses import asdict
from pathlib import Path

import torch
from tqdm import tqdm

from ..models.dflash import DFlashDrafter
from ..models.hf_config import DecoderConfig, DrafterConfig, TargetConfig
from ..models.registry import load_target
from ..worker.worker_config import DTYPES
from .drafter import block_loss, cosine_lr, init_weights, sample_anchors
from .drafter_args import DrafterTrainArgs
from .drafter_data import capture_features, feature_mode, regenerated_data, target_dtype
from .export import save_zlab


def default_layer_ids(num_target_layers: int, k: int = 3) -> list[int]:
    """Deep targets: z-lab's rule. Shallow ones (< 8 layers): spread over 0..N-2."""
    from ..models.hf_config import default_target_layer_ids

    if num_target_layers >= 8:
        return default_target_layer_ids(num_target_layers, 5)
    k = min(k, num_target_layers - 1)
    return sorted({round(i * (num_target_layers - 2) / max(1, k - 1)) for i in range(k)})


def make_drafter(args: DrafterTrainArgs, tcfg: TargetConfig, mask_id: int) -> DFlashDrafter:
    t = tcfg.decoder
    decoder = DecoderConfig(
        hidden_size=t.hidden_size, intermediate_size=t.intermediate_size,
        num_layers=args.num_layers, num_heads=t.num_heads, num_kv_heads=t.num_kv_heads,
        head_dim=t.head_dim, rms_norm_eps=t.rms_norm_eps, rope_theta=t.rope_theta,
        rope_scaling=1.0, max_position=t.max_position, attention_bias=False)
    ids = args.target_layer_ids or default_layer_ids(t.num_layers)
    cfg = DrafterConfig(decoder=decoder, vocab_size=tcfg.vocab_size, block_size=args.block_size,
                        target_layer_ids=ids, mask_token_id=mask_id,
                        target_hidden_size=t.hidden_size)
    cfg.check_fits(tcfg)
    drafter = DFlashDrafter(cfg).to(args.device)
    init_weights(drafter)
    drafter.rope.to(args.device)
    return drafter


# layer_attention: training builds full-attention layers only (`drafter.block_attention`)
_SAME_DRAFTER = ("block_size", "target_layer_ids", "mask_token_id", "vocab_size",
                 "target_hidden_size", "layer_attention")
_SAME_DECODER = ("num_layers", "hidden_size", "intermediate_size", "num_heads", "num_kv_heads",
                 "head_dim", "rope_theta", "rms_norm_eps", "attention_bias")


def init_from(drafter: DFlashDrafter, model_dir: str) -> None:
    """Start from an existing drafter's weights (fine-tuning on more data, say). Its shape and
    target conditioning must match what this run builds."""
    from ..models.hf_config import DrafterConfig

    mine, theirs = drafter.cfg, DrafterConfig.load(model_dir)
    pairs = [(n, getattr(mine.decoder, n), getattr(theirs.decoder, n)) for n in _SAME_DECODER]
    pairs += [(n, getattr(mine, n), getattr(theirs, n)) for n in _SAME_DRAFTER]
    for name, want, got in pairs:
        if want != got:
            raise ValueError(f"--init-from {model_dir}: {name} is {got!r} there but {want!r} in "
                             f"this run")
    drafter.load_state_dict(DFlashDrafter.from_pretrained(model_dir).state_dict())


@torch.no_grad()
def evaluate(drafter, embed, head, seqs, mask_id, args, rng) -> dict:
    """Held-out metrics at the target's precision: fp32 for an fp32 target (a bf16 one would
    need a full-precision copy of its LM head per sequence), else the training autocast."""
    total, correct, count, inv_tau = 0.0, 0, 0, 0.0
    fp32 = head.dtype == torch.float32
    for s in seqs:
        anchors = sample_anchors(s, args.block_size, args.num_anchors, rng)
        if anchors:
            with contextlib.nullcontext() if fp32 else autocast(args):
                r = block_loss(drafter, embed, head, s, anchors, mask_id, args.block_size,
                               args.gamma)
            total += float(r.loss)
            correct += r.correct_first
            count += r.count_first
            inv_tau += r.inv_tau_sum
    return {"heldout_loss": total / max(1, len(seqs)),
            "heldout_first_acc": correct / max(1, count),
            # Decoding visits an anchor with probability ~1/tau there (a block covers tau
            # positions), so the tau it sees per verify step is the harmonic mean over
            # positions, not the plain mean (which repetitive stretches inflate).
            "heldout_tau": count / inv_tau if inv_tau else 1.0}


def train(args: DrafterTrainArgs) -> Path:
    torch.set_num_threads(args.threads)
    out, work = Path(args.out), Path(args.out) / "work"
    work.mkdir(parents=True, exist_ok=True)
    tcfg = TargetConfig.load(args.target)
    from ..core.tokenizer import Tokenizer

    tok = Tokenizer.maybe_load(args.target)
    mask_id = (tok.token_id("<|MASK|>") if tok else None)
    mask_id = tcfg.vocab_size - 1 if mask_id is None else mask_id
    torch.manual_seed(args.seed)  # the drafter's initial weights
    drafter = make_drafter(args, tcfg, mask_id)
    ckpt = work / "checkpoint.pt"
    state = torch.load(ckpt, weights_only=False) if ckpt.is_file() else None
    if state is not None and state.get("num_seqs", args.num_seqs) < args.num_seqs:
        # growing the data under a running schedule would change the run half-way
        raise SystemExit(f"{ckpt} is a run started with --num-seqs {state['num_seqs']}; to "
                         f"train on {args.num_seqs} use a fresh --out (copy work/data.pt there "
                         f"to keep the regenerated ones; --init-from {out} to start from it)")
    if args.init_from and state is None:  # resuming restores the checkpoint's weights instead
        init_from(drafter, args.init_from)  # checked before any regeneration
    # before the target loads (regeneration runs its own copy); a checkpointed run keeps its data
    data = regenerated_data(args, work, grow=state is None)
    train_seqs, heldout = data["train"], data["heldout"]
    if len(train_seqs) < args.batch_seqs or not heldout:
        raise SystemExit(
            f"too little data: {len(train_seqs)} training sequences (--batch-seqs "
            f"{args.batch_seqs} needs as many) and {len(heldout)} held-out ones are usable "
            f"(responses of >= {2 * args.block_size} tokens)"
            + (f"; does {args.prompts} hold enough distinct prompts?" if args.prompts else ""))
    target = load_target(args.target, DTYPES[target_dtype(args)], args.device)
    embed = target.embed_tokens.weight.detach()
    head = target.lm_head.weight.detach()
    if args.precision == "fp32" and head.dtype != torch.float32:  # once, not per sequence
        embed, head = embed.float(), head.float()
    layer_ids = drafter.cfg.target_layer_ids
    online = feature_mode(args, train_seqs, len(layer_ids) * tcfg.decoder.hidden_size) == "online"
    capture_features(target, heldout if online else heldout + train_seqs, layer_ids)
    num_seqs = (state or {}).get("num_seqs", args.num_seqs)
    opt = torch.optim.AdamW(drafter.parameters(), lr=args.lr, weight_decay=0.0)
    step, elapsed = 0, 0.0
    rng = random.Random(args.seed)
    if state is not None:
        drafter.load_state_dict(state["drafter"])
        opt.load_state_dict(state["optimizer"])
        step, elapsed, args.log = state["step"], state["elapsed"], state["log"]
        rng.setstate(state["rng"])
        torch.set_rng_state(state["torch_rng"])
        print(f"resumed at step {step} ({elapsed / 60:.1f} min)")

    def progress() -> float:
        if args.minutes:
            return elapsed / (60 * args.minutes)
        return step / args.steps

    def save_checkpoint() -> None:
        tmp = ckpt.with_suffix(".tmp")
        torch.save({"drafter": drafter.state_dict(), "optimizer": opt.state_dict(),
                    "num_seqs": num_seqs, "step": step, "elapsed": elapsed, "log": args.log,
                    "rng": rng.getstate(), "torch_rng": torch.get_rng_state()}, tmp)
        tmp.replace(ckpt)

    bar = tqdm(total=100 if args.minutes else args.steps, desc="train drafter",
               unit="%" if args.minutes else "step")
    last_ckpt = time.monotonic()
    order: list[int] = []
    stop = _StopOnSignal()
    while progress() < 1.0 and not stop.requested:
        t0 = time.monotonic()
        for group in opt.param_groups:
            group["lr"] = cosine_lr(int(1000 * progress()), 1000, args.lr)
        if len(order) < args.batch_seqs:  # a new epoch: reshuffle (anchors are resampled too)
            order = list(range(len(train_seqs)))
            rng.shuffle(order)
        batch = [train_seqs[order.pop()] for _ in range(args.batch_seqs)]
        if online:
            capture_features(target, batch, layer_ids, progress=False, to_host=False)
        losses = []
        with autocast(args):
            for s in batch:
                anchors = sample_anchors(s, args.block_size, args.num_anchors, rng)
                r = block_loss(drafter, embed, head, s, anchors, mask_id, args.block_size,
                               args.gamma)
                losses.append(r.loss)
            loss = torch.stack(losses).mean()
        loss_value = float(loss.detach())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if online:
            for s in batch:
                s.features = None
        torch.nn.utils.clip_grad_norm_(drafter.parameters(), 1.0)
        opt.step()
        step += 1
        elapsed += time.monotonic() - t0
        bar.n = round(100 * progress()) if args.minutes else step
        bar.set_postfix(loss=f"{loss_value:.3f}", step=step)
        if step % args.eval_every == 0:
            entry = {"step": step, "minutes": elapsed / 60, "train_loss": loss_value}
            entry.update(evaluate(drafter, embed, head, heldout, mask_id, args, random.Random(0)))
            args.log.append(entry)
            tqdm.write(json.dumps(entry))
        if time.monotonic() - last_ckpt > 60 * args.checkpoint_minutes:
            save_checkpoint()
            last_ckpt = time.monotonic()
    bar.close()
    save_checkpoint()
    stop.restore()
    if stop.requested:  # interrupted: the checkpoint holds the progress; rerun to continue
        raise SystemExit(f"stopped by signal at step {step}; rerun the same command to resume")
    save_zlab(drafter, out, tcfg.decoder.num_layers)
    summary = {k: v for k, v in asdict(args).items() if k != "log"}
    # what the run trained on (work/data.pt grows to --num-seqs but never shrinks)
    summary["data"] = {"train_seqs": len(train_seqs), "heldout_seqs": len(heldout),
                       "train_response_tokens": sum(len(s.token_ids) - s.prompt_len
                                                    for s in train_seqs)}
    (out / "train_log.json").write_text(json.dumps({"args": summary, "log": args.log}, indent=1))
    plot_curves(args.log, out / "train_curves.png")
    return out


class _StopOnSignal:
    """SIGINT/SIGTERM end the training loop after the current step (then a checkpoint is saved)
    instead of killing it mid-step, so an interrupted run loses nothing."""

    def __init__(self):
        self.requested = False
        self._old = {}
        if threading.current_thread() is threading.main_thread():  # signals reach only main
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.requested = True

    def restore(self) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)


def autocast(args: DrafterTrainArgs):
    """Mixed precision for the forward (weights and optimizer state stay fp32)."""
    device_type = torch.device(args.device).type
    return torch.autocast(device_type, dtype=torch.bfloat16, enabled=args.precision == "bf16")


def plot_curves(log: list[dict], path: Path) -> None:
    if not log:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [e["step"] for e in log]
    fig, (a, b, c) = plt.subplots(1, 3, figsize=(14, 4))
    a.plot(steps, [e["train_loss"] for e in log], label="train")
    a.plot(steps, [e["heldout_loss"] for e in log], label="held-out")
    a.set(xlabel="step", ylabel="weighted block loss", title="drafter loss")
    a.legend()
    b.plot(steps, [e["heldout_first_acc"] for e in log])
    b.set(xlabel="step", ylabel="accuracy", title="held-out first-position accuracy")
    c.plot(steps, [e.get("heldout_tau", float("nan")) for e in log], label="per verify step")
    if any("heldout_tau_mean_over_anchors" in e for e in log):  # an older metric, when logged
        c.plot(steps, [e.get("heldout_tau_mean_over_anchors", float("nan")) for e in log],
               label="mean over anchors")
    c.legend()
    c.set(xlabel="step", ylabel="tokens per verify step", title="held-out greedy tau")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def parse_args(argv: list[str] | None = None) -> DrafterTrainArgs:
    d = DrafterTrainArgs(target="", out="")
    p = argparse.ArgumentParser(prog="dflash-ray train-drafter", description=__doc__)
    p.add_argument("--target", required=True, help="target model directory")
    p.add_argument("--out", required=True, help="output drafter directory (z-lab format)")
    p.add_argument("--layers", type=int, default=d.num_layers, dest="num_layers")
    p.add_argument("--block-size", type=int, default=d.block_size)
    p.add_argument("--target-layer-ids", type=lambda s: [int(x) for x in s.split(",")])
    p.add_argument("--num-seqs", type=int, default=d.num_seqs)
    p.add_argument("--heldout-seqs", type=int, default=d.heldout_seqs,
                   help="sequences held out for evaluation (made once, never grown)")
    p.add_argument("--response-tokens", type=int, default=d.response_tokens)
    p.add_argument("--num-anchors", type=int, default=d.num_anchors)
    p.add_argument("--batch-seqs", type=int, default=d.batch_seqs)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--gamma", type=float, default=d.gamma)
    p.add_argument("--minutes", type=float, default=d.minutes)
    p.add_argument("--steps", type=int, default=None, help="train for N steps instead")
    p.add_argument("--eval-every", type=int, default=d.eval_every)
    p.add_argument("--threads", type=int, default=d.threads)
    p.add_argument("--device", default=d.device)
    p.add_argument("--precision", choices=("bf16", "fp32"), default=d.precision,
                   help="bf16: autocast forward, fp32 master weights")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--prompts", metavar="JSONL",
                   help="prompts to regenerate responses from, one JSON object per line: "
                   "{\"messages\": [...]} (the target's chat template), {\"prompt\": \"...\"} "
                   "or {\"prompt_ids\": [...]}; default: windows of the Python stdlib source")
    p.add_argument("--max-prompt-tokens", type=int, default=d.max_prompt_tokens,
                   help="skip longer prompts of --prompts")
    p.add_argument("--target-dtype", choices=("auto", "float32", "bfloat16"),
                   default=d.target_dtype, help="auto: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--features", choices=("auto", "cached", "online"), default=d.features,
                   help="cached: all target features in host memory, captured once; online: "
                   "recomputed by the target every step (real targets' data does not fit); "
                   "auto: cached while they take at most half the available memory")
    p.add_argument("--init-from", metavar="DRAFTER_DIR",
                   help="start from this drafter's weights (fresh optimizer and schedule)")
    ns = vars(p.parse_args(argv))
    if ns["steps"] is not None:
        ns["minutes"] = None
    return DrafterTrainArgs(**ns)


def main(argv: list[str] | None = None) -> int:
    print(train(parse_args(argv)))
    return 0
