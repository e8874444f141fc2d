"""Train asrshrink's bundled reference transducers on the synthetic speech corpus: the LSTM RNN-T
(``mlperf-rnnt`` family, the default) or a Conformer transducer in NeMo's layout
(``--family nemo-conformer-transducer``).

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

The Conformer recipe (``--family nemo-conformer-transducer``, sizes in ``CONFORMER``): first a SentencePiece BPE
tokenizer (``--vocab-size`` pieces, NeMo's tokenizer settings) is trained on the train split's transcripts,
normalised as asrshrink normalises transcripts for character models (lower case, numbers spelt out, letters,
space and apostrophe); it is stored as tokenizer.model in the feature bank folder (the bank's labels are its
ids) and in OUT. NeMo's features (80 log-mels every 10 ms) go into their own bank. The schedule is Noam's
(``--schedule noam``: linear warm-up to --lr, then inverse square root decay), which does not depend on
--steps, so a run resumed with a larger --steps continues on the same curve. ``export --nemo FILE`` also writes
a .nemo archive with a NeMo config synthesized from the model's sizes (``nemo_archive.nemo_config_for``).

    python examples/train_reference.py train --family nemo-conformer-transducer --corpus data/corpus2 \
        --out runs/conformer --bank runs/bank-nemo --lr 2e-3 --warmup 800 --steps 20000
    python examples/train_reference.py export --out runs/conformer --to asrshrink/assets/reference_conformer \
        --nemo runs/conformer/model.nemo
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
from asrshrink.models.mlperf_rnnt import MLPERF_LABELS, MlperfRnnt, MlperfRnntConfig  # noqa: E402
from asrshrink.models.nemo_conformer import NemoConformerConfig, NemoConformerTransducer  # noqa: E402
from asrshrink.training.data import FeatureBank  # noqa: E402
from asrshrink.training.loop import TrainConfig, load_trained_modules, train  # noqa: E402
from asrshrink.training.objectives import transducer_ctc_loss  # noqa: E402

#: The bundled model's sizes: MLPerf topology, encoder 256 wide (2 + 3 LSTM, time stacking x2),
#: one 256-wide prediction LSTM, joint 256. 3.5 M parameters, 14 MB in float32.
REFERENCE = MlperfRnntConfig(encoder_hidden=256, encoder_pre_layers=2, stack_time_factor=2, encoder_post_layers=3,
                             pred_hidden=256, pred_layers=1, joint_hidden=256, dropout=0.1)

#: The Conformer reference's sizes: FastConformer-style dw_striding subsampling x8 with 64 channels (80 ms encoder
#: frames keep the joint lattice small; 64 rather than 144 channels halve the subsampling's time on the CPU), d_model
#: 144, 10 layers, 4 heads, conv kernel 15, one 320-wide prediction LSTM, joint 320 without dropout (no random mask
#: over the (B, T', U+1, 320) lattice each step), dropout 0.1 elsewhere. The vocabulary comes from the tokenizer.
CONFORMER = NemoConformerConfig(d_model=144, n_layers=10, n_heads=4, ff_expansion_factor=4, conv_kernel_size=15,
                                subsampling="dw_striding", subsampling_factor=8, subsampling_conv_channels=64,
                                pred_hidden=320, pred_rnn_layers=1, joint_hidden=320, dropout=0.1,
                                dropout_pre_encoder=0.1, dropout_att=0.1, pred_dropout=0.1, joint_dropout=0.0)
FAMILIES = ("mlperf-rnnt", "nemo-conformer-transducer")
TOKENIZER = "tokenizer.model"
#: Characters the tokenizer is trained on: transcripts are normalised to the MLPerf labels (a-z, space, ').
TOKENIZER_CHARS = MLPERF_LABELS

CONSOLE = Console(highlight=False)


def log(message: str) -> None:
    CONSOLE.print(time.strftime("%H:%M:%S"), message, soft_wrap=True)


def read_transcripts(split: Path) -> list[str]:
    """The split's transcripts normalised to ``TOKENIZER_CHARS`` (empty ones dropped)."""
    from asrshrink.audio.text import normalize_text

    texts = []
    for line in (split / "manifest.jsonl").read_text(encoding="utf-8").splitlines():
        if line.strip():
            text = normalize_text(json.loads(line)["text"], TOKENIZER_CHARS)
            if text:
                texts.append(text)
    return texts


def train_tokenizer(texts: list[str], vocab_size: int) -> bytes:
    """A SentencePiece BPE model of ``vocab_size`` pieces trained on ``texts``, with the options of NeMo's
    ``process_asr_text_tokenizer.py`` (character coverage 1.0, no BOS/EOS, <unk> as id 0); its bytes."""
    import io

    import sentencepiece

    proto = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_writer=proto, vocab_size=vocab_size, model_type="bpe",
        character_coverage=1.0, bos_id=-1, eos_id=-1, unk_id=0, hard_vocab_limit=False,
        shuffle_input_sentence=True, input_sentence_size=len(texts), num_threads=1, seed_sentencepiece_size=10**6,
        minloglevel=2)
    return proto.getvalue()


def conformer_config(tokenizer: bytes, layers: int | None = None, width: int | None = None) -> NemoConformerConfig:
    import dataclasses

    from asrshrink.audio.text import SentencePieceVocabulary

    return dataclasses.replace(CONFORMER, vocabulary=SentencePieceVocabulary(tokenizer).to_json(),
                               n_layers=layers or CONFORMER.n_layers, d_model=width or CONFORMER.d_model)


def lstm_config(width: int | None = None) -> MlperfRnntConfig:
    """The reference LSTM's topology, every LSTM and the joint ``width`` wide (default 256)."""
    import dataclasses

    if not width:
        return REFERENCE
    return dataclasses.replace(REFERENCE, encoder_hidden=width, pred_hidden=width, joint_hidden=width)


def tokenizer_for(args: argparse.Namespace, out: Path, bank_dir: Path, start: bytes | None = None) -> bytes:
    """The run's tokenizer: OUT's (a resumed run), else the bank's, else ``start`` (the tokenizer of the model
    given to --init), else a new one trained on the train split; stored in OUT and in the bank folder."""
    from asrshrink.io import atomic_write

    for place in (out / TOKENIZER, bank_dir / TOKENIZER):
        if place.is_file():
            data = place.read_bytes()
            break
    else:
        data = start
    if data is None:
        texts = read_transcripts(Path(args.corpus) / "train")
        log(f"training a {args.vocab_size}-piece SentencePiece BPE tokenizer on {len(texts)} transcripts")
        data = train_tokenizer(texts, args.vocab_size)
    if (bank_dir / TOKENIZER).is_file() and (bank_dir / TOKENIZER).read_bytes() != data:
        raise SystemExit(f"{bank_dir / TOKENIZER} differs from {out / TOKENIZER}: the bank's labels are another "
                         f"tokenizer's ids; use another --bank")
    for place in (out / TOKENIZER, bank_dir / TOKENIZER):
        place.parent.mkdir(parents=True, exist_ok=True)
        if not place.is_file():
            atomic_write(place, lambda tmp: tmp.write_bytes(data))
    return data


def widen_lstm(start: nn.Module, model: nn.Module) -> None:
    """Load the weights of ``start``, a reference LSTM, into ``model``, the same topology wider, so that
    ``model`` computes exactly what ``start`` does: each hidden, gate or stacked dimension is a run of blocks
    of the old width, copied into the first units of the new blocks; a matrix's columns that read the new
    units are zero, so they cannot change the old units' values, while their rows (what feeds the new units)
    keep ``model``'s random initialisation, and so do the prediction embedding's new columns (the new input
    dims of the prediction LSTM; with its reading columns at zero, both zero would never learn)."""
    old_width, new_width = start.config.encoder_hidden, model.config.encoder_hidden
    if model.config != lstm_config(new_width) or start.config != lstm_config(old_width) or new_width < old_width:
        raise SystemExit("--init: widening takes the reference LSTM's topology at a smaller --width")

    def index(old: int, new: int) -> torch.Tensor:  # where each old index lands in the new dimension
        if old == new:
            return torch.arange(old)
        if old % old_width or new != old // old_width * new_width:
            raise SystemExit(f"--init: cannot widen a dimension of {old} to {new}")
        j = torch.arange(old)
        return j // old_width * new_width + j % old_width

    target = model.state_dict()
    for name, value in start.state_dict().items():
        fresh = target[name].clone()
        places = [index(o, n) for o, n in zip(value.shape, fresh.shape)]
        if fresh.dim() == 2 and not name.endswith("embed.weight"):
            fresh[:, torch.ones(fresh.shape[1], dtype=torch.bool).index_fill_(0, places[1], False)] = 0
        if fresh.dim() == 1:
            fresh[places[0]] = value
        else:
            fresh[places[0][:, None], places[1][None, :]] = value
        target[name] = fresh
    model.load_state_dict(target)


def build(family: str, ctc: bool, tokenizer: bytes | None = None, layers: int | None = None,
          width: int | None = None) -> tuple[nn.Module, nn.Module | None]:
    if family == "nemo-conformer-transducer":
        model = NemoConformerTransducer(conformer_config(tokenizer, layers, width))
    else:
        model = MlperfRnnt(lstm_config(width))
    head = nn.Linear(model.aux_dim, model.vocabulary.size) if ctc else None
    return model, head


def cmd_train(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    conformer = args.family == "nemo-conformer-transducer"
    bank_dir = Path(args.bank) if args.bank else out / "bank-train"
    start = load_model(args.init)[0] if args.init and not args.resume else None
    start_tokenizer = getattr(start.vocabulary, "model_proto", None) if start is not None else None
    tokenizer = tokenizer_for(args, out, bank_dir, start_tokenizer) if conformer else None
    model, head = build(args.family, args.ctc_weight > 0, tokenizer, args.layers, args.width)
    inter = nn.ModuleDict({name.replace(".", "_"): nn.Linear(model.aux_dim, model.vocabulary.size)
                           for name in _inter_ctc_layers(args)})
    torch.manual_seed(args.seed)
    if start is not None:
        if start.vocabulary != model.vocabulary:
            raise SystemExit(f"{args.init} has another vocabulary than this run's tokenizer; use another --out/--bank")
        try:
            if args.family == "mlperf-rnnt" and start.config != model.config:
                widen_lstm(start, model)
                log(f"widened {args.init} from {start.config.encoder_hidden} to {model.config.encoder_hidden} "
                    f"units: the same function, new units to train")
            else:
                model.load_state_dict(start.state_dict())
        except RuntimeError:
            raise SystemExit(f"{args.init} has other sizes than this run's model; give the --width and --layers "
                             f"it was trained with") from None
        log(f"starting from the weights of {args.init} (fresh optimizer and schedule)")
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
    if bank.features.shape[1] != model.feature_config.feature_dim:
        raise SystemExit(f"{bank_dir} holds {bank.features.shape[1]}-dimensional features, this model reads "
                         f"{model.feature_config.feature_dim}: use a bank made for this family (--bank)")
    hours = bank.lengths.sum() * model.feature_config.frame_shift_seconds / 3600
    params = sum(p.numel() for p in model.parameters())
    log(f"train bank: {len(bank)} utterances, {hours:.1f} h; {args.family} model: {params:,} parameters")
    dev = open_dataset(Path(args.corpus) / "dev", vocabulary=model.vocabulary, limit=args.dev_limit, seed=0)
    max_frames = args.max_frames or (9000 if conformer else 3000)
    config = TrainConfig(steps=args.steps, lr=args.lr, warmup_steps=args.warmup, max_frames=max_frames,
                         max_batch=args.max_batch, seed=args.seed, checkpoint_every=args.checkpoint_every,
                         log_every=args.log_every, schedule=args.schedule or ("noam" if conformer else "cosine"))
    options = {k: v for k, v in vars(args).items() if k != "func"}
    (out / "config.json").write_text(json.dumps({"model": model.config.to_json(),
                                                 "train": options}, indent=2))

    inter_heads = {name: inter[name.replace(".", "_")] for name in _inter_ctc_layers(args)}

    def loss_fn(batch):
        return transducer_ctc_loss(model, batch, ctc_head=head, ctc_weight=args.ctc_weight, inter_ctc=inter_heads,
                                   inter_weight=args.inter_ctc_weight)

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
    if inter_heads:
        modules["inter_ctc"] = inter
    with bar:
        result = train(model, loss_fn, bank, config, out, extra_modules=modules, resume=args.resume,
                       on_log=on_log, on_checkpoint=on_checkpoint)
    log(f"stopped at step {result['step']}" + (" (interrupted; resume with --resume)" if result["interrupted"]
                                                else ""))


def _inter_ctc_layers(args: argparse.Namespace) -> list[str]:
    """Encoder layers given an intermediate CTC head (--inter-ctc 3,6: Conformer layers 3 and 6)."""
    if not args.inter_ctc:
        return []
    if args.family != "nemo-conformer-transducer":
        raise SystemExit("--inter-ctc is for the Conformer (its encoder layers keep the encoder's frame rate)")
    return [f"encoder.layers.{int(i)}" for i in args.inter_ctc.split(",")]


def cmd_export(args: argparse.Namespace) -> None:
    out = Path(args.out)
    config = out / "config.json"
    options = json.loads(config.read_text())["train"] if config.is_file() else {}
    family = options.get("family", "mlperf-rnnt")
    tokenizer = (out / TOKENIZER).read_bytes() if family == "nemo-conformer-transducer" else None
    model, head = build(family, True, tokenizer, options.get("layers"), options.get("width"))
    modules = {"model": model}
    state = torch.load(out / "train_state.pt", map_location="cpu", weights_only=True)
    if "ctc_head" in state["modules"]:
        modules["ctc_head"] = head
    step = load_trained_modules(out, modules)
    if family == "nemo-conformer-transducer":
        import dataclasses

        from asrshrink.models.nemo_archive import nemo_config_for

        # the synthesized NeMo config travels with the model, so that a .nemo can be written from it later
        trained = model
        model = NemoConformerTransducer(dataclasses.replace(trained.config, nemo_config=nemo_config_for(trained.config)))
        model.load_state_dict(trained.state_dict())
    if args.nemo:  # from the float32 weights
        from asrshrink.models.nemo_archive import write_nemo

        log(f"wrote {write_nemo(model.eval(), args.nemo)}")
    if args.float16:
        model.half()
    path = save_model(model.eval(), args.to, extra={"training": {"step": step, "recipe": "examples/train_reference.py",
                                                                 "options": options}})
    log(f"wrote {path} (step {step}, {sum(p.numel() for p in model.parameters())} parameters"
        f"{', float16 storage' if args.float16 else ''})")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train (or resume) the reference model")
    t.add_argument("--family", choices=FAMILIES, default="mlperf-rnnt")
    t.add_argument("--corpus", default="data/synth")
    t.add_argument("--out", default="runs/reference")
    t.add_argument("--steps", type=int, default=8000)
    t.add_argument("--lr", type=float, default=1.5e-3)
    t.add_argument("--warmup", type=int, default=300)
    t.add_argument("--max-frames", type=int, default=None, help="padded feature frames per batch (default 3000 "
                   "30 ms frames for mlperf-rnnt, 9000 10 ms frames for the Conformer)")
    t.add_argument("--schedule", choices=("cosine", "noam"), default=None,
                   help="learning-rate schedule after warm-up (default cosine for mlperf-rnnt, noam for the Conformer)")
    t.add_argument("--vocab-size", type=int, default=256, help="SentencePiece pieces (Conformer)")
    t.add_argument("--max-batch", type=int, default=48)
    t.add_argument("--max-duration", type=float, default=15.0)
    t.add_argument("--ctc-weight", type=float, default=0.5)
    t.add_argument("--layers", type=int, default=None, help="Conformer layers (default 10)")
    t.add_argument("--width", type=int, default=None,
                   help="mlperf-rnnt: every LSTM and the joint this wide (default 256); Conformer: d_model "
                        "(default 144, a multiple of its 4 heads)")
    t.add_argument("--inter-ctc", default=None, help="Conformer layers with an intermediate CTC head during "
                   "training, e.g. 3,6 (the heads are not part of the exported model)")
    t.add_argument("--inter-ctc-weight", type=float, default=0.3)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--threads", type=int, default=2)
    t.add_argument("--checkpoint-every", type=int, default=100)
    t.add_argument("--eval-every", type=int, default=500)
    t.add_argument("--dev-limit", type=int, default=150)
    t.add_argument("--log-every", type=int, default=20)
    t.add_argument("--bank", default=None, help="feature bank folder to use or build (default OUT/bank-train)")
    t.add_argument("--resume", action="store_true")
    t.add_argument("--init", default=None, help="start from this model's weights (an asrshrink model of the same "
                                                  "sizes, e.g. the bundled one; for mlperf-rnnt also a narrower "
                                                  "one, widened to --width computing the same function) with a "
                                                  "fresh optimizer and schedule")
    t.set_defaults(func=cmd_train)
    e = sub.add_parser("export", help="write the trained model in asrshrink's format")
    e.add_argument("--out", default="runs/reference")
    e.add_argument("--to", default="asrshrink/assets/reference")
    e.add_argument("--float16", action="store_true", help="store the weights as float16")
    e.add_argument("--nemo", default=None, help="also write the model as this .nemo archive (Conformer)")
    e.set_defaults(func=cmd_export)
    args = parser.parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
