"""Train the embedded default model: a byte-level BPE tokenizer and a small Llama.

Both are trained on the ``train`` split of :mod:`hpsearch.zoo._corpus`; training stops early on
the ``valid`` split and keeps the best checkpoint; the ``test`` split is never read here.

    python -m hpsearch.zoo.train --tokenizer-only --out DIR   # tokenizer alone (CPU, ~10 s)
    python -m hpsearch.zoo.train --out DIR --device cuda       # tokenizer, then the model
    python -m hpsearch.zoo.train --out DIR --device cuda --tokenizer TOKDIR   # reuse a tokenizer

``DIR`` receives ``config.json``, ``model.safetensors`` (float16), the tokenizer files and
``training.json`` (hyper-parameters, steps, valid perplexities, wall time, device, corpus sha256,
library versions). Given a seed, data order and initialisation are fixed; GPU kernels make the
result reproducible up to floating-point non-associativity.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import pathlib
import platform
import sys
import time

import torch
import torch.nn.functional as F
import tqdm
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from hpsearch.zoo._corpus import corpus_sha256, load_files

BOS, EOS, PAD = "<s>", "</s>", "<pad>"


def train_tokenizer(texts: list[str], vocab_size: int):
    """Train a byte-level BPE tokenizer (GPT-2 pre-tokenisation, no normaliser: exact round trip).

    Returns:
        A ``PreTrainedTokenizerFast`` with ``<s>`` (prepended by default), ``</s>`` and ``<pad>``.
    """
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=2, special_tokens=[BOS, EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD,
        model_max_length=1024, clean_up_tokenization_spaces=False)


def pack(tokenizer, texts: list[str]) -> torch.Tensor:
    """Concatenate ``<s> text </s>`` for each text into one 1-D stream of token ids."""
    encodings = tokenizer.backend_tokenizer.encode_batch(texts, add_special_tokens=False)
    stream = []
    for enc in encodings:
        stream += [tokenizer.bos_token_id, *enc.ids, tokenizer.eos_token_id]
    return torch.tensor(stream, dtype=torch.long)


def model_config(tokenizer, args):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads, max_position_embeddings=1024,
        rms_norm_eps=1e-5, initializer_range=0.02, tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id)


def blocks(stream: torch.Tensor, seq_len: int, offset: int = 0) -> torch.Tensor:
    """Non-overlapping ``[n, seq_len]`` blocks of ``stream`` starting at ``offset``."""
    n = (stream.numel() - offset) // seq_len
    return stream[offset:offset + n * seq_len].view(n, seq_len)


def batches(stream: torch.Tensor, seq_len: int, batch_size: int, seed: int):
    """Yield training batches forever: each epoch a fresh random offset and block permutation."""
    epoch = 0
    while True:
        g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        data = blocks(stream, seq_len, int(torch.randint(seq_len, (1,), generator=g)))
        perm = torch.randperm(data.shape[0], generator=g)
        for i in range(0, perm.numel() - batch_size + 1, batch_size):
            yield epoch, data[perm[i:i + batch_size]]
        epoch += 1


@torch.no_grad()
def perplexity(model, data: torch.Tensor, batch_size: int, device: str) -> float:
    """exp(mean next-token cross-entropy) over all predicted positions of ``data`` blocks."""
    model.eval()
    nll, count = 0.0, 0
    for i in range(0, data.shape[0], batch_size):
        x = data[i:i + batch_size].to(device)
        with _autocast(device):
            logits = model(input_ids=x).logits[:, :-1]
        nll += F.cross_entropy(logits.float().flatten(0, 1), x[:, 1:].flatten(),
                               reduction="sum").item()
        count += x[:, 1:].numel()
    model.train()
    return math.exp(nll / count)


def _autocast(device: str):
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.startswith("cuda"))


def lr_at(step: int, args) -> float:
    """Linear warm-up, then cosine decay to ``min_lr_ratio * lr`` at ``max_steps``."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    t = min(1.0, (step - args.warmup) / max(1, args.max_steps - args.warmup))
    cosine = 0.5 * (1 + math.cos(math.pi * t))
    return args.lr * (args.min_lr_ratio + (1 - args.min_lr_ratio) * cosine)


def _optimizer(model, args, device: str):
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": args.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.95), eps=1e-8,
                             fused=device.startswith("cuda"))


def _save_tokenizer(tokenizer, out: pathlib.Path) -> None:
    """Save, naming the class ``PreTrainedTokenizerFast`` so that transformers 4.x loads it too."""
    tokenizer.save_pretrained(out)
    path = out / "tokenizer_config.json"
    config = json.loads(path.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    for key in ("is_local", "local_files_only"):  # load-time state that transformers 5 saves
        config.pop(key, None)
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _sha256(path: pathlib.Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def train_model(tokenizer, args) -> dict:
    """Train, early-stop on ``valid``, save the best checkpoint to ``args.out``; return a record."""
    from transformers import LlamaForCausalLM

    device = args.device
    t0 = time.time()
    train_stream = pack(tokenizer, list(load_files("train").values()))
    valid = blocks(pack(tokenizer, list(load_files("valid").values())), args.seq_len)
    if args.valid_blocks:
        valid = valid[:args.valid_blocks]
    print(f"train {train_stream.numel():,} tokens, valid {valid.numel():,} tokens "
          f"(tokenised in {time.time() - t0:.1f} s)", flush=True)

    torch.manual_seed(args.seed)
    model = LlamaForCausalLM(model_config(tokenizer, args)).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{n_params:,} parameters", flush=True)
    opt = _optimizer(model, args, device)
    data = batches(train_stream, args.seq_len, args.batch_size, args.seed)

    best = {"valid_ppl": math.inf, "step": 0}
    best_state, history, bad_evals, stop = None, [], 0, "max_steps"
    t_train = time.time()
    bar = tqdm.tqdm(range(1, args.max_steps + 1), desc="train", disable=None)  # off if no tty
    for step in bar:
        epoch, x = next(data)
        x = x.to(device, non_blocking=True)
        for group in opt.param_groups:
            group["lr"] = lr_at(step - 1, args)
        with _autocast(device):
            loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step % args.eval_every and step != args.max_steps:
            continue
        train_loss = loss.item()
        ppl = perplexity(model, valid, args.eval_batch_size, device)
        elapsed = time.time() - t_train
        history.append({"step": step, "epoch": epoch, "train_loss": round(train_loss, 4),
                        "valid_ppl": round(ppl, 4), "elapsed_s": round(elapsed, 1)})
        bar.set_postfix(loss=f"{train_loss:.3f}", valid_ppl=f"{ppl:.3f}")
        tqdm.tqdm.write(f"step {step:6d} epoch {epoch:3d} train loss {train_loss:.4f} "
                        f"valid ppl {ppl:.4f} ({elapsed:.0f} s)", file=sys.stdout)
        if ppl < best["valid_ppl"] * (1 - args.min_delta):
            best = {"valid_ppl": ppl, "step": step}
            best_state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
            bad_evals = 0
        else:
            bad_evals += 1
        if bad_evals >= args.patience:
            stop = f"early stop: no valid improvement in {args.patience} evaluations"
            break
        if args.max_minutes and elapsed > 60 * args.max_minutes:
            stop = f"time budget of {args.max_minutes} min"
            break
    bar.close()
    train_s = time.time() - t_train
    print(f"stopped at step {step} ({stop}); best valid ppl {best['valid_ppl']:.4f} "
          f"at step {best['step']}", flush=True)

    model.load_state_dict(best_state)
    model.to(torch.float16).save_pretrained(args.out)
    return {"parameters": n_params, "steps_run": step, "stop_reason": stop,
            "best_step": best["step"], "best_valid_ppl": round(best["valid_ppl"], 4),
            "train_tokens": train_stream.numel(), "valid_tokens": valid.numel(),
            "tokens_seen": step * args.batch_size * args.seq_len,
            "train_wall_s": round(train_s, 1), "history": history}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m hpsearch.zoo.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=pathlib.Path, required=True)
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tokenizer", type=pathlib.Path, default=None,
                   help="directory of an already trained tokenizer (default: train one)")
    p.add_argument("--tokenizer-only", action="store_true")
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--intermediate", type=int, default=768)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--min-lr-ratio", type=float, default=0.1)
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--clip", type=float, default=1.0)
    p.add_argument("--max-steps", type=int, default=4000)
    p.add_argument("--max-minutes", type=float, default=0.0, help="time budget (0: none)")
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--eval-batch-size", type=int, default=64)
    p.add_argument("--valid-blocks", type=int, default=0, help="cap on valid blocks (0: all)")
    p.add_argument("--patience", type=int, default=8, help="evaluations without improvement")
    p.add_argument("--min-delta", type=float, default=1e-3, help="relative improvement needed")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    t0 = time.time()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.tokenizer is None:
        tokenizer = train_tokenizer(list(load_files("train").values()), args.vocab_size)
        print(f"trained tokenizer: {len(tokenizer)} tokens ({time.time() - t0:.1f} s)", flush=True)
    else:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    _save_tokenizer(tokenizer, args.out)
    command = sys.argv[1:] if argv is None else argv
    record = {"command": " ".join(["python -m hpsearch.zoo.train", *command]),
              "args": {k: str(v) if isinstance(v, pathlib.Path) else v
                       for k, v in vars(args).items()},
              "corpus_sha256": corpus_sha256(),
              "tokenizer_json_sha256": _sha256(args.out / "tokenizer.json"),
              "vocab_size": len(tokenizer)}
    if not args.tokenizer_only:
        record.update(train_model(tokenizer, args))
    import tokenizers
    import transformers

    if args.device.startswith("cuda"):
        device = torch.cuda.get_device_name(args.device)
    else:
        device = f"cpu ({platform.machine()}, {torch.get_num_threads()} threads)"
    record.update({
        "wall_s": round(time.time() - t0, 1), "device": device,
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": transformers.__version__,
                     "tokenizers": tokenizers.__version__}})
    (args.out / "training.json").write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {args.out} in {record['wall_s']} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
