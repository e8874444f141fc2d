"""Times forward + backward of asrshrink's RNN-T loss at training-step size on 2 CPU threads."""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from asrshrink.training.rnnt_loss import rnnt_loss  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--frames", type=int, default=150)
    parser.add_argument("--labels", type=int, default=120)
    parser.add_argument("--vocab", type=int, default=29)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    generator = torch.Generator().manual_seed(0)
    b, t, u, v = args.batch, args.frames, args.labels, args.vocab
    logits = torch.randn(b, t, u + 1, v, generator=generator, requires_grad=True)
    targets = torch.randint(1, v, (b, u), generator=generator)
    # Lengths vary across the batch as in a real bucketed batch; the longest fills the padded shape.
    logit_lengths = torch.randint(t * 3 // 4, t + 1, (b,), generator=generator)
    target_lengths = torch.randint(u * 3 // 4, u + 1, (b,), generator=generator)
    logit_lengths[0], target_lengths[0] = t, u

    def step() -> None:
        logits.grad = None
        loss = rnnt_loss(logits, targets, logit_lengths, target_lengths, blank=0, reduction="mean")
        loss.backward()

    for _ in range(3):
        step()
    wall, cpu = [], []
    for _ in range(args.repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        step()
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    wall.sort()
    cpu.sort()
    # Process CPU time (all threads) is printed too: it is less sensitive to other load on a shared machine.
    print(
        f"rnnt_loss forward+backward B={b} T={t} U={u} V={v} threads={args.threads}: "
        f"median {wall[len(wall) // 2] * 1e3:.1f} ms/call wall (min {wall[0] * 1e3:.1f} ms), "
        f"median {cpu[len(cpu) // 2] * 1e3:.1f} ms CPU time, {args.repeats} calls"
    )


if __name__ == "__main__":
    main()
