"""Train asrshrink's bundled reference RNN-T (``mlperf-rnnt`` family) on the synthetic speech corpus.

    python examples/make_corpus.py data/corpus2              # the corpus (see that script)
    python examples/train_reference.py train --corpus data/corpus2 --out runs/reference --steps 8000
    python examples/train_reference.py train --corpus data/corpus2 --out runs/reference --steps 8000 --resume
    python examples/train_reference.py export --out runs/reference --to asrshrink/assets/reference
    python examples/train_reference.py train --corpus data/corpus2 --out runs/more --steps 3000 \
        --init asrshrink/assets/reference/model.safetensors    # continue from a model's weights

Any corpus whose ``train`` and ``dev`` folders ``asrshrink`` can read works (corpus v2's manifests, or the
LibriSpeech layout of the first corpus). ``train`` featurizes the train split once (cached in OUT/bank-train,
or in the folder given by ``--bank`` so that several runs share it), then runs the resumable training loop:
transducer loss plus an auxiliary CTC loss on the lower encoder, SpecAugment, AdamW with warm-up and cosine
decay, gradient clipping, length-bucketed batches. It writes OUT/train_state.pt (atomically, every
--checkpoint-every steps and on Ctrl-C / SIGTERM), OUT/train_log.jsonl (loss curve) and OUT/dev_log.jsonl
(greedy dev WER at each checkpoint). ``--resume`` continues exactly where the last checkpoint stopped.
``export`` writes the trained model in asrshrink's format (model.safetensors) to --to.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn  # noqa: E402
from torch import nn  # noqa: E402

from asrshrink.api import evaluate, load_model, open_dataset, save_model  # noqa: E402
from asrshrink.models.mlperf_rnnt import MlperfRnnt, MlperfRnntConfig  # noqa: E402
from asrshrink.training.data import FeatureBank  # noqa: E402
from asrshrink.training.loop import TrainConfig, load_trained_modules, train  # noqa: E402
from asrshrink.training.objectives import transducer_ctc_loss  # noqa: E402

#: The bundled model's sizes: MLPerf topology, encoder 256 wide (2 + 3 LSTM, time stacking x2),
#: one 256-wide prediction LSTM, joint 256. 3.5 M parameters, 14 MB in float32.
REFERENCE = MlperfRnntConfig(encoder_hidden=256, encoder_pre_layers=2, stack_time_factor=2, encoder_post_layers=3,
                             pred_hidden=256, pred_layers=1, joint_hidden=256, dropout=0.1)


CONSOLE = Console(highlight=False)


def log(message: str) -> None:
    CONSOLE.print(time.strftime("%H:%M:%S"), message, soft_wrap=True)


def build(out: Path, ctc: bool) -> tuple[MlperfRnnt, nn.Module | None]:
    model = MlperfRnnt(REFERENCE)
    head = nn.Linear(model.aux_dim, model.vocabulary.size) if ctc else None
    return model, head


def cmd_train(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    model, head = build(out, args.ctc_weight > 0)
    if args.init and not args.resume:
        start, _ = load_model(args.init)
        model.load_state_dict(start.state_dict())
        log(f"starting from the weights of {args.init} (fresh optimizer and schedule)")
    bank_dir = Path(args.bank) if args.bank else out / "bank-train"
    if (bank_dir / "index.json").exists():
        bank = FeatureBank.load(bank_dir)
    else:
        train_set = open_dataset(Path(args.corpus) / "train", vocabulary=model.vocabulary,
                                 max_duration=args.max_duration)
        log(f"featurizing {len(train_set)} training utterances into {bank_dir}")
        started = time.perf_counter()

        def progress(done: int, total: int) -> None:
            if done % 2000 == 0 or done == total:
                log(f"  featurized {done}/{total} ({time.perf_counter() - started:.0f} s)")

        bank = FeatureBank.build(train_set, model.featurizer, model.vocabulary, bank_dir, progress)
    hours = bank.lengths.sum() * model.feature_config.frame_shift_seconds / 3600
    log(f"train bank: {len(bank)} utterances, {hours:.1f} h")
    dev = open_dataset(Path(args.corpus) / "dev", vocabulary=model.vocabulary, limit=args.dev_limit, seed=0)
    config = TrainConfig(steps=args.steps, lr=args.lr, warmup_steps=args.warmup, max_frames=args.max_frames,
                         max_batch=args.max_batch, seed=args.seed, checkpoint_every=args.checkpoint_every,
                         log_every=args.log_every)
    options = {k: v for k, v in vars(args).items() if k != "func"}
    (out / "config.json").write_text(json.dumps({"model": REFERENCE.to_json(), "train": options}, indent=2))

    def loss_fn(batch):
        return transducer_ctc_loss(model, batch, ctc_head=head, ctc_weight=args.ctc_weight)

    bar = Progress(TextColumn("training"), BarColumn(), MofNCompleteColumn(),
                   TextColumn("loss {task.fields[loss]} lr {task.fields[lr]}"), TimeRemainingColumn(),
                   console=CONSOLE)
    task = bar.add_task("train", total=args.steps, loss="-", lr="-")

    def on_log(step: int, m: dict) -> None:
        bar.update(task, completed=step, loss=f"{m['loss']:.3f}", lr=f"{m['lr']:.2e}")
        audio_rate = m["frames_per_second"] * model.feature_config.frame_shift_seconds
        log(f"step {step} loss {m['loss']:.3f} rnnt {m['rnnt']:.3f} ctc {m.get('ctc', 0):.3f} "
            f"lr {m['lr']:.2e} |g| {m['grad_norm']:.2f} {audio_rate:.1f} audio-s/s epoch {m['epoch']}")

    def on_checkpoint(step: int, m: dict) -> None:
        if step % args.eval_every:
            return
        model.eval()
        result = evaluate(model, dev)
        model.train()
        log(f"dev WER {result.wer:.2f} % CER {result.cer:.2f} % at step {step} ({result.seconds:.0f} s)")
        with open(out / "dev_log.jsonl", "a") as f:
            f.write(json.dumps({"step": step, "wer": result.wer, "cer": result.cer,
                                "train_loss": m.get("loss")}) + "\n")

    modules = {"ctc_head": head} if head is not None else {}
    with bar:
        result = train(model, loss_fn, bank, config, out, extra_modules=modules, resume=args.resume,
                       on_log=on_log, on_checkpoint=on_checkpoint)
    log(f"stopped at step {result['step']}" + (" (interrupted; resume with --resume)" if result["interrupted"]
                                                else ""))


def cmd_export(args: argparse.Namespace) -> None:
    model, head = build(Path(args.out), True)
    modules = {"model": model}
    state_path = Path(args.out) / "train_state.pt"
    state = torch.load(state_path, map_location="cpu", weights_only=True)
    if "ctc_head" in state["modules"]:
        modules["ctc_head"] = head
    step = load_trained_modules(args.out, modules)
    config = Path(args.out) / "config.json"
    options = json.loads(config.read_text())["train"] if config.is_file() else {}
    path = save_model(model.eval(), args.to, extra={"training": {"step": step, "recipe": "examples/train_reference.py",
                                                                 "options": options}})
    log(f"wrote {path} (step {step}, {sum(p.numel() for p in model.parameters())} parameters)")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train (or resume) the reference model")
    t.add_argument("--corpus", default="data/synth")
    t.add_argument("--out", default="runs/reference")
    t.add_argument("--steps", type=int, default=8000)
    t.add_argument("--lr", type=float, default=1.5e-3)
    t.add_argument("--warmup", type=int, default=300)
    t.add_argument("--max-frames", type=int, default=3000, help="padded 30 ms feature frames per batch")
    t.add_argument("--max-batch", type=int, default=48)
    t.add_argument("--max-duration", type=float, default=15.0)
    t.add_argument("--ctc-weight", type=float, default=0.5)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--threads", type=int, default=2)
    t.add_argument("--checkpoint-every", type=int, default=100)
    t.add_argument("--eval-every", type=int, default=500)
    t.add_argument("--dev-limit", type=int, default=150)
    t.add_argument("--log-every", type=int, default=20)
    t.add_argument("--bank", default=None, help="feature bank folder to use or build (default OUT/bank-train)")
    t.add_argument("--resume", action="store_true")
    t.add_argument("--init", default=None, help="start from this model's weights (an asrshrink model of the same "
                                                  "sizes, e.g. the bundled one) with a fresh optimizer and schedule")
    t.set_defaults(func=cmd_train)
    e = sub.add_parser("export", help="write the trained model in asrshrink's format")
    e.add_argument("--out", default="runs/reference")
    e.add_argument("--to", default="asrshrink/assets/reference")
    e.set_defaults(func=cmd_export)
    args = parser.parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
