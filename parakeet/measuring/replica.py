"""
Random-weight replicas of the cache-aware FastConformer RNNT family.

A replica has the real architecture (layers, widths, attention context,
subsampling, prediction and joint networks, vocabulary size) and a
SentencePiece tokenizer trained on the spot, but random weights.  It is built
entirely offline, saved as a ``.nemo`` file and loaded through the same
``--model PATH`` route as any checkpoint, so its compute cost and its code
path are those of the real thing.

Random RNNT weights are degenerate: the joint network sees an encoder output
that barely moves over time, so greedy decoding emits either nothing or the
same token ``max_symbols`` times on every frame.  ``build_replica`` therefore
re-centres the joint's encoder projection on the encoder's mean output and
picks a blank bias for which greedy decoding emits about 0.3 tokens per
80 ms frame, as real speech does, so that the decoder's share of a step is
the real one and the tokens a replica emits depend on the audio it hears.
"""

import os
import random
import string
import tempfile

import attr

from ..clients.audiofiles import SAMPLE_RATE, calibration_audio


@attr.s(frozen=True)
class Architecture:
    n_layers = attr.ib()
    d_model = attr.ib()
    n_heads = attr.ib()
    features = attr.ib()
    subsampling_channels = attr.ib()
    pred_hidden = attr.ib()
    pred_layers = attr.ib()
    joint_hidden = attr.ib()
    vocab_size = attr.ib()
    #: [left, look-ahead] in encoder frames, or several such: the
    #: look-aheads the model is trained for, the first its default.
    att_context_size = attr.ib(default=(70, 1))
    conv_kernel_size = attr.ib(default=9)
    eou_token = attr.ib(default=True)
    #: Tokens greedy decoding emits per encoder frame, as calibrated.
    tokens_per_frame = attr.ib(default=0.3)
    #: A multilingual model's language prompts: (code, prompt index) pairs;
    #: empty for a model without them.
    languages = attr.ib(default=())


#: Nemotron 3.5 ASR's language prompts (its ``prompt_dictionary``): 40
#: locales, short codes for some, and ``auto``, under which the model
#: picks the language and tags it.
MULTILINGUAL_PROMPTS = tuple(
    [("en-US", 0), ("en", 0), ("en-GB", 1), ("es-ES", 2), ("es-US", 3), ("es", 3),
     ("zh-CN", 4), ("zh-TW", 5), ("hi-IN", 6), ("hi", 6), ("ar-AR", 7), ("ar", 7),
     ("fr-FR", 8), ("fr", 8), ("de-DE", 9), ("de", 9), ("ja-JP", 10), ("ru-RU", 11),
     ("ru", 11), ("pt-BR", 12), ("pt-PT", 13), ("pt", 13), ("ko-KR", 14), ("ko", 14)]
    + [(code, index) for index, code in enumerate(
        "it-IT nl-NL pl-PL tr-TR uk-UA ro-RO el-GR cs-CZ hu-HU sv-SE da-DK fi-FI "
        "no-NO sk-SK hr-HR bg-BG lt-LT".split(), 15)]
    + [("th-TH", 32), ("vi-VN", 33), ("id-ID", 34), ("ms-MY", 35), ("et-EE", 60),
       ("lv-LV", 61), ("sl-SI", 62), ("he-IL", 64), ("fr-CA", 100), ("auto", 101),
       ("mt-MT", 102), ("nb-NO", 103), ("nn-NO", 104)])


#: Published shapes of the two checkpoints the server serves by name, and a
#: tiny member of the same family that the tests build in seconds (it emits
#: densely, so that tests see many tokens in little audio).
ARCHITECTURES = {
    "small": Architecture(
        n_layers=17, d_model=512, n_heads=8, features=128,
        subsampling_channels=256, pred_hidden=640, pred_layers=1,
        joint_hidden=640, vocab_size=1026),
    "large": Architecture(
        n_layers=24, d_model=1024, n_heads=8, features=128,
        subsampling_channels=256, pred_hidden=640, pred_layers=2,
        joint_hidden=640, vocab_size=1024, eou_token=False,
        att_context_size=((70, 1), (70, 0), (70, 6), (70, 13))),
    "tiny": Architecture(
        n_layers=2, d_model=64, n_heads=4, features=80,
        subsampling_channels=32, pred_hidden=64, pred_layers=1,
        joint_hidden=64, vocab_size=64, tokens_per_frame=4.0),
    # Nemotron 3.5 ASR: the large model with language prompts before the
    # joint, a wider vocabulary with a tag token for each locale, and
    # chunks of 320 (its default), 80, 560 and 1120 ms.
    "multilingual": Architecture(
        n_layers=24, d_model=1024, n_heads=8, features=128,
        subsampling_channels=256, pred_hidden=640, pred_layers=2,
        joint_hidden=640, vocab_size=13088, eou_token=False,
        att_context_size=((56, 3), (56, 0), (56, 6), (56, 13)),
        languages=MULTILINGUAL_PROMPTS),
}
#: The tiny model with the multilingual model's prompts and chunk sizes.
ARCHITECTURES["tiny-multilingual"] = attr.evolve(
    ARCHITECTURES["tiny"], features=128, vocab_size=128, eou_token=False,
    att_context_size=ARCHITECTURES["multilingual"].att_context_size,
    languages=MULTILINGUAL_PROMPTS)


def language_tags(arch):
    """The tag tokens a multilingual model writes after what it heard:
    one for each locale among its prompts (``<de-DE>``)."""
    return ["<%s>" % code for code, _ in arch.languages if "-" in code]


def _corpus(path, vocab_size, seed):
    """Write pseudo-text rich enough for a BPE vocabulary of vocab_size."""
    rng = random.Random(seed)
    n_words = max(300, vocab_size * 3)
    words = []
    for _ in range(n_words):
        length = rng.randint(2, 9)
        words.append("".join(rng.choice(string.ascii_lowercase)
                             for _ in range(length)))
    weights = [1.0 / (rank + 1) for rank in range(len(words))]
    with open(path, "w") as f:
        for _ in range(max(2000, vocab_size * 20)):
            f.write(" ".join(rng.choices(words, weights, k=12)) + "\n")


def train_tokenizer(directory, vocab_size, eou_token=True, seed=0, sentences=None, symbols=()):
    """Train a SentencePiece BPE tokenizer laid out the way NeMo loads it,
    on sentences, or on pseudo-text when none are given; symbols: control
    tokens it holds besides ``<EOU>``."""
    import sentencepiece

    os.makedirs(directory, exist_ok=True)
    corpus = os.path.join(directory, "corpus.txt")
    if sentences is None:
        _corpus(corpus, vocab_size, seed)
    else:
        with open(corpus, "w") as f:
            f.writelines(s + "\n" for s in sentences)
    # The joint network adds the blank; the tokenizer holds the rest.
    sentencepiece.SentencePieceTrainer.train(
        input=corpus, model_prefix=os.path.join(directory, "tokenizer"),
        vocab_size=vocab_size - 1, model_type="bpe", character_coverage=1.0,
        bos_id=-1, eos_id=-1, unk_id=0,
        user_defined_symbols=(["<EOU>"] if eou_token else []) + list(symbols),
        hard_vocab_limit=False, minloglevel=2, num_threads=1)
    processor = sentencepiece.SentencePieceProcessor(
        model_file=os.path.join(directory, "tokenizer.model"))
    with open(os.path.join(directory, "vocab.txt"), "w") as f:
        for i in range(processor.get_piece_size()):
            f.write(processor.id_to_piece(i) + "\n")
    os.remove(corpus)
    return directory


def model_config(arch, tokenizer_dir):
    from omegaconf import OmegaConf

    prompts = {}
    if arch.languages:
        prompts = {"initialize_prompt_feature": True, "num_prompts": 128,
                   "prompt_dictionary": dict(arch.languages)}
    return OmegaConf.create({
        "sample_rate": SAMPLE_RATE,
        "model_defaults": dict({
            "enc_hidden": arch.d_model,
            "pred_hidden": arch.pred_hidden,
            "joint_hidden": arch.joint_hidden,
        }, **prompts),
        "tokenizer": {"dir": tokenizer_dir, "type": "bpe"},
        "preprocessor": {
            "_target_": "nemo.collections.asr.modules.AudioToMelSpectrogramPreprocessor",
            "sample_rate": SAMPLE_RATE, "normalize": "NA",
            "window_size": 0.025, "window_stride": 0.01, "window": "hann",
            "features": arch.features, "n_fft": 512, "frame_splicing": 1,
            "dither": 0.0, "pad_to": 0,
        },
        "encoder": {
            "_target_": "nemo.collections.asr.modules.ConformerEncoder",
            "feat_in": arch.features, "feat_out": -1,
            "n_layers": arch.n_layers, "d_model": arch.d_model,
            "subsampling": "dw_striding", "subsampling_factor": 8,
            "subsampling_conv_channels": arch.subsampling_channels,
            "causal_downsampling": True, "ff_expansion_factor": 4,
            "self_attention_model": "rel_pos", "n_heads": arch.n_heads,
            "att_context_size": list(arch.att_context_size),
            "att_context_style": "chunked_limited", "xscaling": not arch.languages,
            "use_bias": not arch.languages,
            "pos_emb_max_len": 5000,
            "conv_kernel_size": arch.conv_kernel_size,
            "conv_norm_type": "layer_norm", "conv_context_size": "causal",
            "dropout": 0.0, "dropout_pre_encoder": 0.0, "dropout_emb": 0.0,
            "dropout_att": 0.0,
        },
        "decoder": {
            "_target_": "nemo.collections.asr.modules.RNNTDecoder",
            "normalization_mode": None, "random_state_sampling": False,
            "blank_as_pad": True,
            "prednet": {"pred_hidden": arch.pred_hidden,
                        "pred_rnn_layers": arch.pred_layers,
                        "t_max": None, "dropout": 0.0},
        },
        "joint": {
            "_target_": "nemo.collections.asr.modules.RNNTJoint",
            "log_softmax": None, "preserve_memory": False,
            "fuse_loss_wer": False,
            "jointnet": {"joint_hidden": arch.joint_hidden,
                         "activation": "relu", "dropout": 0.0},
        },
        "decoding": {"strategy": "greedy_batch", "greedy": {"max_symbols": 10}},
        "loss": {"loss_name": "default"},
        "optim": None,
    })


def _calibrate_joint(model, tokens_per_frame):
    """Centre the joint on the encoder's output, then raise the blank bias
    until greedy decoding emits about tokens_per_frame tokens per encoder
    frame, the rate of real speech (a word or so a second), on tones, on
    silence and on faint noise alike."""
    import numpy as np
    import torch

    def encode(audio):
        signal = torch.from_numpy(audio)[None]
        length = torch.tensor([signal.shape[1]])
        feats, feat_len = model.preprocessor(input_signal=signal, length=length)
        encoded, encoded_len = model.encoder(audio_signal=feats, length=feat_len)
        if getattr(model, "concat", False):
            # What the joint sees: the encoder's output under a language prompt.
            prompt = torch.zeros(1, encoded.shape[2], model.num_prompts)
            prompt[:, :, 0] = 1.0
            encoded = model.prompt_kernel(
                torch.cat([encoded.transpose(1, 2), prompt], dim=-1)).transpose(1, 2)
        return encoded, encoded_len

    quiet = np.zeros(4 * SAMPLE_RATE, np.float32)
    faint = (0.01 * np.random.default_rng(99).standard_normal(4 * SAMPLE_RATE)).astype(np.float32)
    with torch.no_grad():
        encoded = torch.cat([encode(audio)[0] for audio in (
            [calibration_audio(s) for s in range(4)] + [quiet, faint])], dim=2)
        mean = encoded.mean(dim=(0, 2))
        spread = encoded.std(dim=2).mean()
        proj = model.joint.enc
        weight = proj.weight * (4.0 / spread)
        proj.weight.copy_(weight)
        proj.bias.sub_(weight @ mean)
        out = model.joint.joint_net[-1]
        probes = [encode(audio) for audio in (calibration_audio(99, 6.0), quiet, faint)]
        base = out.bias[-1].clone()
        for step in range(160):
            out.bias[-1] = base + step / 4
            rates = []
            for enc, enc_len in probes:
                hyp = model.decoding.rnnt_decoder_predictions_tensor(
                    enc, enc_len, return_hypotheses=True)[0]
                rates.append(len(hyp.y_sequence) / int(enc_len[0]))
            if sum(rates) / len(rates) <= tokens_per_frame and max(rates) <= 2 * tokens_per_frame:
                break


def build_replica(name_or_arch, path, seed=0):
    """Build a random-weight replica and save it as a ``.nemo`` file at path."""
    import torch

    from ..engine.nemo.loading import quiet_nemo

    quiet_nemo()
    from nemo.collections.asr.models import EncDecRNNTBPEModel, EncDecRNNTBPEModelWithPrompt

    arch = ARCHITECTURES[name_or_arch] if isinstance(name_or_arch, str) else name_or_arch
    torch.manual_seed(seed)
    with tempfile.TemporaryDirectory() as scratch:
        tokenizer_dir = train_tokenizer(
            os.path.join(scratch, "tokenizer"), arch.vocab_size,
            eou_token=arch.eou_token, seed=seed, symbols=language_tags(arch))
        model_class = EncDecRNNTBPEModelWithPrompt if arch.languages else EncDecRNNTBPEModel
        model = model_class(cfg=model_config(arch, tokenizer_dir))
        model.eval()
        _calibrate_joint(model, arch.tokens_per_frame)
        tmp = path + ".partial"
        model.save_to(tmp)
    os.replace(tmp, path)
    return path
