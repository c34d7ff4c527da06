"""Sequences per second of the LSTM sequence VAE: training steps and greedy generation.

A training step is: bidirectional LSTM encoder, a Linear to a diagonal Gaussian, one reparameterised z,
the decoder's teacher-forced ``log_prob``, the closed-form KL, backward and an Adam update, on batches
of ``--batch`` sequences. Generation is the greedy free-running decode (``p(x|z).mean``) of ``--gen-batch``
prior draws. Each figure is the rate over ``--seconds`` of repeated work after one warm-up call.

Data: NAS-Bench-201 cells (6 steps x 5, enumerated) and dictionary words (13 steps x 27; the system's
/usr/share/dict/words when installed, else random letter strings of the same shape, said in the header).

    python benchmarks/bench_lstm.py [--device cpu] [--hidden 256] [--seconds 4]
"""

from __future__ import annotations

import argparse
import platform
import time

import numpy as np
import torch
from common import machine_name

from rhovae.data.sequences import END, LETTERS, SequenceVocab, encode_batch, nas201_dataset, words_dataset
from rhovae.errors import RhovaeError
from rhovae.nets.lstm import LSTMDecoder, LSTMEncoder


def words_data() -> tuple[np.ndarray, SequenceVocab, str]:
    try:
        train, _, _, vocab = words_dataset(None, seed=0)
        return train, vocab, f"dictionary words from {vocab.source}"
    except RhovaeError:
        vocab = SequenceVocab("words", (*LETTERS, END), len(LETTERS), 0, 13)
        rng = np.random.default_rng(0)
        words = [list(rng.choice(LETTERS, size=rng.integers(3, 13))) for _ in range(8192)]
        return encode_batch(words, None, vocab), vocab, "random letter strings (no dictionary installed)"


def rate(work, items: int, seconds: float, device: torch.device) -> float:
    """Items per second of ``work()`` over about ``seconds``, after one warm-up call."""
    work()
    if device.type == "cuda":
        torch.cuda.synchronize()
    calls, start = 0, time.perf_counter()
    while True:
        work()
        calls += 1
        if device.type == "cuda":
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            return calls * items / elapsed


def bench(x: np.ndarray, vocab: SequenceVocab, args, device: torch.device) -> tuple[float, float]:
    torch.manual_seed(0)
    shape = (vocab.max_len, vocab.width)
    encoder = LSTMEncoder(shape, hidden=args.hidden).to(device)
    head = torch.nn.Linear(encoder.out_features, 2 * args.latent_dim).to(device)
    decoder = LSTMDecoder(args.latent_dim, shape, vocab, hidden=args.hidden).to(device)
    params = [*encoder.parameters(), *head.parameters(), *decoder.parameters()]
    opt = torch.optim.Adam(params, lr=1e-3)
    data = torch.from_numpy(x).to(device)
    generator = torch.Generator().manual_seed(0)

    def train_step() -> None:
        batch = data[torch.randint(len(data), (args.batch,), generator=generator).to(device)]
        mu, log_var = head(encoder(batch)).chunk(2, dim=-1)
        z = mu + (0.5 * log_var).exp() * torch.randn_like(mu)
        kl = 0.5 * (mu.pow(2) + log_var.exp() - 1 - log_var).sum(-1)
        loss = (kl - decoder(z).log_prob(batch)).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    z = torch.randn(args.gen_batch, args.latent_dim, generator=generator).to(device)

    def generate() -> torch.Tensor:
        return decoder(z).mean

    return rate(train_step, args.batch, args.seconds, device), rate(
        generate, args.gen_batch, args.seconds, device
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--hidden", type=int, default=256, help="LSTM width of encoder and decoder")
    parser.add_argument("--latent-dim", type=int, default=16)
    parser.add_argument("--batch", type=int, default=128, help="training batch size")
    parser.add_argument("--gen-batch", type=int, default=1024, help="sequences per generation call")
    parser.add_argument("--seconds", type=float, default=4.0, help="timed seconds per figure")
    parser.add_argument(
        "--epoch-limit", type=int, default=4000, help="training sequences per timed trainer epoch (0: skip)"
    )
    args = parser.parse_args()
    device = torch.device(args.device)

    nas, _, _, nas_vocab = nas201_dataset(None, seed=0)
    words, words_vocab, words_source = words_data()
    where = machine_name(device)
    print(f"# {platform.platform()}, python {platform.python_version()}, torch {torch.__version__}")
    print(
        f"# device {device} ({where}), {torch.get_num_threads()} CPU threads; hidden {args.hidden}, ", end=""
    )
    print(f"latent {args.latent_dim}, batch {args.batch}, generation batch {args.gen_batch}")
    print(f"# words: {words_source}")
    print(f"{'data':<8} {'steps x width':>14} {'train seq/s':>12} {'greedy gen seq/s':>17}")
    for name, x, vocab in (("nas201", nas, nas_vocab), ("words", words, words_vocab)):
        train_rate, gen_rate = bench(x, vocab, args, device)
        print(f"{name:<8} {f'{vocab.max_len} x {vocab.width}':>14} {train_rate:>12,.0f} {gen_rate:>17,.0f}")
    if args.epoch_limit:
        trainer_epochs(args, device)


def trainer_epochs(args, device: torch.device) -> None:
    """Seconds per training epoch of ``rhovae train --model lstm`` (the trainer's own loop, with the real
    posterior heads), diagonal vs AR(1), on the first ``--epoch-limit`` training sequences of each set,
    and the same scaled to the whole training split."""
    from rhovae.config import RunConfig
    from rhovae.data import load_data
    from rhovae.train import make_run, train_epoch

    print(f"\n# rhovae's trainer, --model lstm, first {args.epoch_limit} training sequences per epoch")
    print("| data | train sequences | diagonal (s) | ar1 (s) | ar1 / diagonal | full epoch, diagonal (s) |")
    print("|---|---:|---:|---:|---:|---:|")
    for name in ("nas201", "words"):
        try:
            full = load_data(name, device=device)
        except RhovaeError as e:
            print(f"| {name} | skipped: {e} |")
            continue
        data = load_data(name, device=device, limit=args.epoch_limit)
        seconds = {}
        for posterior in ("diagonal", "ar1"):
            settings = dict(latent_dim=args.latent_dim, hidden=args.hidden, batch_size=args.batch)
            cfg = RunConfig(model="lstm", dataset=name, posterior=posterior, **settings).validate()
            torch.manual_seed(0)
            run = make_run(cfg, data)
            train_epoch(run, 1)  # warm-up
            seconds[posterior] = min(train_epoch(run, 1)["epoch_seconds"] for _ in range(2))
        n = len(data.train)
        scaled = seconds["diagonal"] * len(full.train) / n
        print(
            f"| {name} | {n:,} | {seconds['diagonal']:.2f} | {seconds['ar1']:.2f} | "
            f"{seconds['ar1'] / seconds['diagonal']:.2f}× | {scaled:.1f} ({len(full.train):,}) |",
            flush=True,
        )


if __name__ == "__main__":
    main()
