"""Train the shipped ``esmc-tiny`` with the masked-LM objective on the real proteins in
``../shared/data`` (held-out 10% never seen). Reproducible from ``--seed``.

    python -m esmc.training.train_tiny --steps 2000 --out esmc/shipped
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from esmc.config import CONFIGS, ESMCConfig
from esmc.model import ESMCNetwork
from esmc.tokenizer import MASK_ID, PAD_ID, TOKEN_TO_ID, encode_ids
from esmc.training.data import DEFAULT_DATA_DIR, STANDARD_AMINO_ACIDS, crop, load_split
from esmc.checkpoints.load import save_safetensors

MASK_RATE = 0.15
STANDARD_IDS = torch.tensor([TOKEN_TO_ID[c] for c in STANDARD_AMINO_ACIDS])


def corrupt(ids: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT-style corruption of residues: 15% selected; of those 80% mask, 10% random, 10% kept.

    Returns (inputs, selected bool mask). ``ids`` holds one sequence with BOS/EOS.
    """
    residues = torch.zeros_like(ids, dtype=torch.bool)
    residues[1:-1] = True
    selected = (torch.rand(ids.shape, generator=gen) < MASK_RATE) & residues
    if not selected.any():
        selected[1 + torch.randint(len(ids) - 2, (1,), generator=gen)] = True
    action = torch.rand(ids.shape, generator=gen)
    inputs = ids.clone()
    inputs[selected & (action < 0.8)] = MASK_ID
    random_pos = selected & (action >= 0.8) & (action < 0.9)
    picks = STANDARD_IDS[torch.randint(len(STANDARD_IDS), ids.shape, generator=gen)]
    inputs[random_pos] = picks[random_pos]
    return inputs, selected


def make_batch(sequences, rng: random.Random, gen: torch.Generator, batch_tokens: int, crop_len: int):
    ids_list, inputs_list, selected_list = [], [], []
    total = 0
    while total < batch_tokens:
        ids = torch.tensor(encode_ids(crop(rng.choice(sequences), crop_len - 2, rng)))
        inputs, selected = corrupt(ids, gen)
        ids_list.append(ids)
        inputs_list.append(inputs)
        selected_list.append(selected)
        total += len(ids)
    pad = torch.nn.utils.rnn.pad_sequence
    # Padded (B, L) batches train faster on the CPU than packed ones (one SDPA call per layer).
    return (
        pad(inputs_list, batch_first=True, padding_value=PAD_ID),
        pad(ids_list, batch_first=True, padding_value=PAD_ID),
        pad(selected_list, batch_first=True, padding_value=False),
    )


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def train(args: argparse.Namespace) -> None:
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    rng = random.Random(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    split = load_split(Path(args.data_dir))
    config: ESMCConfig = CONFIGS["esmc-tiny"]
    model = ESMCNetwork(config)
    init_weights(model)
    params = sum(p.numel() for p in model.parameters())
    print(f"esmc-tiny: {params:,} parameters; {len(split.train)} train / {len(split.heldout)} held-out proteins")
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr, betas=(0.9, 0.98), eps=1e-8,
    )
    log = []
    start = time.time()
    model.train()
    for step in range(args.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args.steps, args.lr, args.warmup)
        inputs, targets, selected = make_batch(split.train, rng, gen, args.batch_tokens, args.crop)
        out = model(inputs)
        loss = F.cross_entropy(out.sequence_logits[selected], targets[selected])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 50 == 0 or step == args.steps - 1:
            elapsed = time.time() - start
            log.append({"step": step, "loss": round(loss.item(), 4), "seconds": round(elapsed, 1)})
            print(f"step {step:5d}  loss {loss.item():.4f}  ppl {math.exp(loss.item()):6.2f}  {elapsed:7.1f}s", flush=True)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.eval()
    save_safetensors(model, out_dir / "esmc-tiny.safetensors")
    meta = {
        "config": {"d_model": config.d_model, "n_heads": config.n_heads, "n_layers": config.n_layers},
        "parameters": params,
        "seed": args.seed,
        "steps": args.steps,
        "batch_tokens": args.batch_tokens,
        "crop": args.crop,
        "lr": args.lr,
        "train_proteins": len(split.train),
        "heldout_proteins": len(split.heldout),
        "seconds": round(time.time() - start, 1),
        "log": log,
    }
    (out_dir / "esmc-tiny.training.json").write_text(json.dumps(meta, indent=1))


def init_weights(model: ESMCNetwork) -> None:
    """Small normal init; output projections scaled down by depth."""
    for name, p in model.named_parameters():
        if p.ndim >= 2:
            std = 0.02 / math.sqrt(2 * model.config.n_layers) if name.endswith(("out_proj.weight", "ffn.3.weight")) else 0.02
            torch.nn.init.normal_(p, std=std)
        elif name.endswith("bias"):
            torch.nn.init.zeros_(p)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--batch-tokens", type=int, default=8192)
    parser.add_argument("--crop", type=int, default=256, help="max tokens per protein (BOS/EOS included)")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--data-dir", default=str(DEFAULT_DATA_DIR))
    parser.add_argument("--out", default="esmc/shipped")
    train(parser.parse_args())


if __name__ == "__main__":
    main()
