"""
Train the built-in demo model (``parakeet-server serve --model demo``).

The corpus (``parakeet.training.corpus``) is text of a voice-assistant domain, its
sentences and text that breaks them (random word sequences, digit strings,
numbers, single words, commands cut short), read aloud, at once or a few
words at a time, by five offline synthesisers in many voices and settings
(``parakeet.training.voices``) and put
through rooms, noise, microphones and telephones (``parakeet.training.augment``);
every transcript ends with ``<EOU>`` so that the model learns to mark the
end of an utterance.  Whole voices that never occur in training (flite's
rms, festival's ked, two of Kokoro's, espeak-ng's held-out variants) make
the validation set.  The model is a
small cache-aware FastConformer RNNT of the same family and streaming
geometry as the small checkpoint (causal 8x dw_striding subsampling,
chunked_limited attention with context [70, 1]: 160 ms chunks) with an
auxiliary CTC head, trained with nemo_toolkit's own training loop (its hybrid
RNNT-CTC model; the transducer loss vectorised for CPUs,
``parakeet.training.transducer_loss``).

docs/demo-model.rst gives the commands that made the shipped model, with
their wall times.  The synthesisers that are not installed are left out
(espeak-ng, flite and festival from Debian; piper and Kokoro from the
``train`` extra).  ``--utterances``, ``--steps`` and ``--batch-size`` scale it down
(the test suite runs a few steps on a handful of utterances).
"""

import argparse
import json
import multiprocessing
import os
import random
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.join(HERE, ".."), HERE]

from parakeet.measuring.replica import (  # noqa: E402
    Architecture, model_config, train_tokenizer)
from parakeet.training import corpus, voices  # noqa: E402
from parakeet.training.transducer_loss import TransducerLoss  # noqa: E402

#: The demo model: the small model's family and streaming geometry, sized to
#: train on a few CPU cores in well under an hour.
DEMO = Architecture(
    n_layers=6, d_model=144, n_heads=4, features=80, subsampling_channels=64,
    pred_hidden=160, pred_layers=1, joint_hidden=160, vocab_size=128)


def _write_shard(job):
    directory, count, pool, seed, augmented = job
    return corpus.write_set(directory, count, pool, seed, text=corpus.mixed_text,
                            augmented=augmented)


def synthesize_sets(work, utterances, heldout, seed, processes):
    """The training set (training voices, augmented) and the held-out set
    (heldout utterances from each of ``voices.HELDOUT``'s pools, plain)
    under work, synthesised in parallel shards; returns their manifests."""
    jobs = {"train": [], "heldout": []}
    train = voices.TRAIN.installed()
    shards = max(1, min(processes * 4, utterances // 50 or 1))
    for i in range(shards):
        count = utterances // shards + (1 if i < utterances % shards else 0)
        jobs["train"].append((os.path.join(work, "train", "shard%d" % i), count,
                              train, seed + i, True))
    for i, (name, pool) in enumerate(sorted(voices.HELDOUT.items())):
        if pool.installed().rows:
            jobs["heldout"].append((os.path.join(work, "heldout", "set%d" % i), heldout,
                                    pool, seed + 1_000_000 + i, False))
    if processes == 1:
        # In this process: a fork of a process that holds threads (a test
        # runner's, torch's) can hang.
        parts = {name: list(map(_write_shard, shard_jobs)) for name, shard_jobs in jobs.items()}
    else:
        with multiprocessing.Pool(processes) as workers:
            parts = {name: workers.map(_write_shard, shard_jobs, chunksize=1)
                     for name, shard_jobs in jobs.items()}
    manifests = {}
    for name, paths in parts.items():
        manifests[name] = os.path.join(work, name + ".json")
        with open(manifests[name], "w") as out:
            for part in paths:
                with open(part) as f:
                    out.write(f.read())
    return manifests


def training_config(arch, tokenizer_dir, manifests, batch_size, steps, lr):
    from omegaconf import OmegaConf

    cfg = model_config(arch, tokenizer_dir)
    for key in ("dropout", "dropout_pre_encoder", "dropout_emb", "dropout_att"):
        cfg.encoder[key] = 0.1
    cfg.decoder.prednet.dropout = 0.1
    cfg.joint.jointnet.dropout = 0.1
    dataset = {"sample_rate": corpus.SAMPLE_RATE, "num_workers": 1,
               "pin_memory": False, "max_duration": 20.0, "min_duration": 0.1}
    # Batches of similar lengths, in random order: less padding to compute.
    cfg.train_ds = OmegaConf.create(dict(
        dataset, manifest_filepath=manifests["train"], batch_size=batch_size,
        shuffle=True, use_semi_sorted_batching=True, drop_last=False))
    cfg.validation_ds = OmegaConf.create(dict(
        dataset, manifest_filepath=manifests["heldout"], batch_size=batch_size,
        shuffle=False))
    # An auxiliary CTC head on the encoder (NeMo's hybrid RNNT-CTC model)
    # gives the encoder a direct signal: without it, a transducer this small
    # trained from scratch sits for thousands of steps at the loss of its
    # prediction network alone, emitting nothing.  The server decodes with
    # the transducer.
    cfg.aux_ctc = OmegaConf.create({
        "ctc_loss_weight": 0.5, "use_cer": False, "ctc_reduction": "mean_batch",
        "decoder": {"_target_": "nemo.collections.asr.modules.ConvASRDecoder",
                    "feat_in": arch.d_model, "num_classes": -1, "vocabulary": []},
        "decoding": {"strategy": "greedy_batch"}})
    cfg.spec_augment = OmegaConf.create({
        "_target_": "nemo.collections.asr.modules.SpectrogramAugmentation",
        "freq_masks": 2, "time_masks": 1, "freq_width": 10, "time_width": 0.05})
    cfg.optim = OmegaConf.create({
        "name": "adamw", "lr": lr, "betas": [0.9, 0.98], "weight_decay": 1e-3,
        "sched": {"name": "CosineAnnealing", "warmup_steps": min(500, steps // 10),
                  "min_lr": lr / 50, "max_steps": steps}})
    return cfg


def _progress_printer(every, snapshots=None):
    """A callback that prints the loss every ``every`` steps and the
    validation metrics, and after each validation saves the model under
    snapshots (a folder), so that a run cut short can go on with --init."""
    import lightning.pytorch as pl

    class Progress(pl.Callback):
        def __init__(self):
            self.started = time.time()

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            step = trainer.global_step
            if step % every == 0:
                loss = outputs["loss"] if isinstance(outputs, dict) else outputs
                print("step %d loss %.3f lr %.2e %.0f s" % (
                    step, float(loss), trainer.optimizers[0].param_groups[0]["lr"],
                    time.time() - self.started), flush=True)

        def on_validation_end(self, trainer, module):
            metrics = {k: round(float(v), 4) for k, v in trainer.callback_metrics.items()
                       if k.startswith("val")}
            print("step %d validation %s" % (trainer.global_step, metrics), flush=True)
            if snapshots and trainer.global_step:
                os.makedirs(snapshots, exist_ok=True)
                module.save_to(os.path.join(snapshots, "step%d.nemo" % trainer.global_step))

    return Progress()


def train(cfg, steps, seed, val_every, init=None, snapshots=None):
    """Train from cfg (from scratch, or from init's weights: a model this
    script wrote, trained further on cfg's data and schedule)."""
    import lightning.pytorch as pl
    import torch
    from omegaconf import open_dict

    from nemo.collections.asr.models import EncDecHybridRNNTCTCBPEModel

    torch.manual_seed(seed)
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, max_steps=steps, logger=False,
        enable_checkpointing=False, enable_progress_bar=False,
        log_every_n_steps=50, val_check_interval=min(val_every, steps),
        check_val_every_n_epoch=None, num_sanity_val_steps=0,
        gradient_clip_val=1.0, callbacks=[_progress_printer(25, snapshots)])
    if init is None:
        model = EncDecHybridRNNTCTCBPEModel(cfg=cfg, trainer=trainer)
    else:
        model = EncDecHybridRNNTCTCBPEModel.restore_from(init, map_location="cpu",
                                                         trainer=trainer)
        model.float()
        with open_dict(model.cfg):
            for key in ("train_ds", "validation_ds", "optim", "spec_augment"):
                model.cfg[key] = cfg[key]
        model.setup_training_data(model.cfg.train_ds)
        model.setup_validation_data(model.cfg.validation_ds)
    # NeMo's CPU transducer losses walk the lattice in Python; same loss,
    # vectorised.
    model.loss = TransducerLoss(blank=model.decoder.blank_idx)
    trainer.fit(model)
    return model


def evaluate(model_path, manifest, frame_ms=80):
    """Held-out accuracy: WER offline and streaming, overall and per engine,
    and where <EOU> lands.  (tools/evaluate_demo_model.py measures more.)"""
    import soundfile

    from evaluate_demo_model import decode_streaming, end_of_utterance
    from parakeet.engine.engine import Engine

    engine = Engine.load(model_path, device="cpu", num_slots=16, batch_size=16)
    rows = corpus.read_manifest(manifest)
    audios = [soundfile.read(row["audio_filepath"], dtype="float32")[0] for row in rows]
    decoded = [engine.decode_offline(audio) for audio in audios]
    offline, streaming, by_engine = [], [], {}
    identical = 0
    for row, (tokens, _, _), live in zip(rows, decoded, decode_streaming(engine, audios)):
        reference = row["text"].replace(corpus.EOU, "")
        identical += live == tokens
        offline.append((reference, engine.text_of(tokens)))
        streaming.append((reference, engine.text_of(live)))
        by_engine.setdefault(row["tts"]["engine"], []).append(offline[-1])
    report = {
        "utterances": len(rows),
        "wer_offline": round(corpus.word_error_rate(offline), 4),
        "wer_streaming": round(corpus.word_error_rate(streaming), 4),
        "streaming_identical_to_offline": identical,
        "wer_by_engine": {name: round(corpus.word_error_rate(pairs), 4)
                          for name, pairs in sorted(by_engine.items())},
        "end_of_utterance": end_of_utterance(engine, rows, decoded, frame_ms),
    }
    return report


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", required=True, help="scratch directory for the corpus")
    parser.add_argument("--out", required=True, help="where to write the .nemo model")
    parser.add_argument("--utterances", type=int, default=4000, help="training utterances")
    parser.add_argument("--heldout", type=int, default=60,
                        help="held-out utterances of each held-out voice set")
    parser.add_argument("--steps", type=int, default=2800, help="optimizer steps")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1.5e-3)
    parser.add_argument("--val-every", type=int, default=700)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--joined", type=int, default=None,
                        help="training streams of 2-3 utterances back to back "
                        "[default: 3/8 of --utterances]")
    parser.add_argument("--init", help="a model this script wrote, to train further "
                        "(its tokenizer is kept)")
    parser.add_argument("--evaluate-only", action="store_true",
                        help="skip training: report --out's accuracy on the held-out set")
    parser.add_argument("--processes", type=int, default=os.cpu_count() or 1,
                        help="synthesis processes")
    args = parser.parse_args(argv)

    from parakeet.engine.nemo.loading import quiet_nemo

    quiet_nemo()
    random.seed(args.seed)
    started = time.time()
    manifests = {}
    for name in ("train", "heldout"):
        path = os.path.join(args.work, name + ".json")
        if os.path.exists(path):
            manifests[name] = path
    if len(manifests) < 2:
        manifests = synthesize_sets(args.work, args.utterances, args.heldout,
                                    args.seed, args.processes)
    synthesized = time.time()
    print("corpus ready in %.0f s: %s" % (synthesized - started, json.dumps(manifests)),
          flush=True)
    if args.evaluate_only:
        print(json.dumps(evaluate(args.out, manifests["heldout"])), flush=True)
        return
    rows = corpus.read_manifest(manifests["train"])
    texts = [row["text"].replace(corpus.EOU, "") for row in rows]
    if args.joined is None:
        args.joined = args.utterances * 3 // 8
    if args.joined:
        # Single utterances and streams of several, in one manifest.
        joined = os.path.join(args.work, "joined", "manifest.json")
        if not os.path.exists(joined):
            joined = corpus.join_set(rows, os.path.dirname(joined), args.joined, args.seed)
        both = os.path.join(args.work, "train-and-joined.json")
        with open(both, "w") as out:
            for path in (manifests["train"], joined):
                with open(path) as f:
                    out.write(f.read())
        manifests = dict(manifests, train=both)
    tokenizer_dir = train_tokenizer(os.path.join(args.work, "tokenizer"),
                                    DEMO.vocab_size, sentences=texts)
    cfg = training_config(DEMO, tokenizer_dir, manifests, args.batch_size,
                          args.steps, args.lr)
    model = train(cfg, args.steps, args.seed, args.val_every, args.init,
                  snapshots=os.path.join(args.work, "snapshots"))
    trained = time.time()
    model.eval()
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    # The shipped model carries no dataset paths from this machine.
    for key in ("train_ds", "validation_ds", "test_ds"):
        if key in model.cfg:
            model.cfg[key].manifest_filepath = None
    # Weights are stored in half precision (half the size); loading casts
    # them back into the float32 modules the config builds.
    for module in (model.encoder, model.decoder, model.joint):
        module.half()
    model.save_to(args.out)
    print("trained %d steps in %.0f s (corpus %.0f s); wrote %s (%.1f MB), seed %d"
          % (args.steps, trained - synthesized, synthesized - started, args.out,
             os.path.getsize(args.out) / 1e6, args.seed), flush=True)
    print("held-out: %s" % json.dumps(evaluate(args.out, manifests["heldout"])), flush=True)


if __name__ == "__main__":
    main()
