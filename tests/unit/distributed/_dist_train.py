"""A minimal distributed training loop built from ``embedtune.training.distributed``, run as one rank.

It does what the recipe does under ``torchrun`` (sharded global batch, cross-rank negatives, DDP or
FSDP2, gradient accumulation, clipping, DCP checkpoints, SIGTERM agreement, consolidation), on
synthetic token batches that are a pure function of (seed, step), so runs can be compared exactly.

Usage (one process per rank; RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT in the environment)::

    python _dist_train.py OUT --strategy ddp|fsdp2 --steps 6 [--resume] [--ckpt-every 1] [--lora]

Writes ``OUT/losses.jsonl`` (rank 0), ``OUT/progress_rank{r}`` (every rank), ``OUT/final.pt`` (full
trainable state, rank 0) and ``OUT/model`` (consolidated BiEncoder folder); exits 143 after SIGTERM.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _dist_harness import dump_stacks_on_sigusr1
from _dist_workers import N_PASSAGES, synthetic_batch, tiny_encoder

from embedtune.training import distributed as D
from embedtune.training.checkpoint import Checkpointer, TrainState
from embedtune.training.loss import InfoNCELoss, LossConfig
from embedtune.training.signals import StopSignals


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--strategy", default="ddp")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--global-batch", type=int, default=8)
    ap.add_argument("--local-batch", type=int, default=2)
    ap.add_argument("--ckpt-every", type=int, default=0)
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--lora", action="store_true")
    ap.add_argument("--dropout", type=float, default=0.1)
    ap.add_argument("--sleep", type=float, default=0.0, help="seconds per step (lets a test send a signal)")
    ap.add_argument("--no-consolidate", action="store_true")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--crash-rank1-at", type=int, default=0, help="rank 1 dies (os._exit) after this step")
    ap.add_argument("--hang-rank1-at", type=int, default=0, help="rank 1 stops responding after this step")
    ap.add_argument("--timeout-minutes", type=float, default=1.0, help="collective timeout")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    dump_stacks_on_sigusr1()
    torch.set_num_threads(1)
    ctx = D.init_distributed(D.DistributedConfig(timeout_minutes=args.timeout_minutes), device="cpu")
    signals = StopSignals().__enter__()  # SIGTERM/SIGINT only set signals.received
    try:
        return _train(args, ctx, signals, out)
    finally:
        signals.__exit__(None, None, None)
        # The wrapped model (DDP holds the process group) went with _train's frame, so the group's
        # gloo threads end here (destroy_distributed collects first), not at interpreter shutdown.
        D.destroy_distributed()


def _train(args: argparse.Namespace, ctx: D.DistContext, signals: StopSignals, out: Path) -> int:
    torch.manual_seed(args.seed)  # identical initial weights (LoRA init too) on every rank
    enc = tiny_encoder(args.dropout)
    if args.lora:
        from peft import LoraConfig, get_peft_model

        enc.backbone = get_peft_model(
            enc.backbone, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
        )
    model = D.wrap_model(enc, args.strategy, ctx)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + 0.1 * s))
    ckpt = Checkpointer(out / "ckpt", keep_last=2, strategy=args.strategy)
    loss_fn = InfoNCELoss(LossConfig(temperature=0.05))
    plan = D.plan_batches(args.global_batch, args.local_batch, ctx.world_size, ctx.rank)
    state = TrainState()
    if args.resume:
        state = ckpt.load(ckpt.resolve("latest"), model=model, optimizer=opt, scheduler=sched)
    else:
        torch.manual_seed(args.seed + 1000 * (ctx.rank + 1))  # each rank its own dropout stream

    while state.step < args.steps:
        batch = synthetic_batch(args.seed * 100_003 + state.step, args.global_batch, seq_q=6, seq_p=8)
        opt.zero_grad(set_to_none=True)
        total = torch.zeros(())
        for rows in plan.all_positions():
            mb = D.slice_batch(batch, rows)
            q = model(**mb["query"])
            p = model(**mb["passages"])
            loss = D.cross_rank_loss(loss_fn, q, p, n_passages=N_PASSAGES, doc_keys=[mb["doc_ids"]])
            (loss / plan.accumulation_steps).backward()
            total += loss.detach() / plan.accumulation_steps
        norm = D.clip_grad_norm([p for p in model.parameters() if p.requires_grad], 1.0)
        opt.step()
        sched.step()
        state.step += 1
        dist.all_reduce(total)
        if ctx.is_main:
            with open(out / "losses.jsonl", "a") as f:
                f.write(
                    json.dumps(
                        {"step": state.step, "loss": total.item() / ctx.world_size, "norm": float(norm)}
                    )
                    + "\n"
                )
        (out / f"progress_rank{ctx.rank}").write_text(str(state.step))
        if ctx.rank == 1 and state.step == args.crash_rank1_at:
            os._exit(3)  # a hard crash: no cleanup, no goodbye to the process group
        if ctx.rank == 1 and state.step == args.hang_rank1_at:
            time.sleep(3600)  # alive but stuck (a deadlock, a hung device): only a timeout helps
        time.sleep(args.sleep)
        sig = D.agree_on_signal(signals.received, ctx)
        if sig or (args.ckpt_every and state.step % args.ckpt_every == 0):
            ckpt.save(state, model=model, optimizer=opt, scheduler=sched)
        if sig:
            print(f"rank {ctx.rank}: stopping after step {state.step} on signal {sig}", flush=True)
            return 128 + sig

    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if ctx.is_main:
        torch.save({k: v.clone() for k, v in full.items()}, out / "final.pt")
    if not args.no_consolidate:
        D.save_consolidated(model, out / "model", ctx)
    return 0


if __name__ == "__main__":
    sys.exit(main())
