"""
Which checkpoint to serve: the model names and sizes the server knows, the
built-in demo model and its sample, and whether a Hugging Face id can be
had, all without importing torch or NeMo.  Loading it is
:mod:`parakeet.engine.nemo.loading`'s.
"""

import os

#: ``--model-size`` names and the checkpoints they stand for.
MODEL_SIZES = {
    "small": "nvidia/parakeet_realtime_eou_120m-v1",
    "large": "nvidia/nemotron-speech-streaming-en-0.6b",
    # Nemotron 3.5 ASR: the large model's architecture with language
    # prompts, 40 locales, punctuation and capitals.
    "multilingual": "nvidia/nemotron-3.5-asr-streaming-0.6b",
}

#: Models that ship inside the package, served with ``--model NAME``.
BUILTIN_MODELS = {
    # Trained by tools/train_demo_model.py on synthetic speech: recognises
    # a small voice-assistant domain with no download at all.
    "demo": os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "demo.nemo"),
}

#: A held-out utterance of the demo model's domain, for trying the server.
DEMO_SAMPLE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data",
                           "demo-sample.wav")
DEMO_SAMPLE_TEXT = ("set an alarm for seven thirty in the morning "
                    "what is the weather in paris tomorrow")

#: Model arithmetic the server offers (``--precision``).
PRECISIONS = ("float32", "bfloat16", "float16", "int8")


def served_name(model_name):
    """What the server calls the model it loaded from model_name: a built-in
    model's name ("demo"), else the Hugging Face id or the file's name."""
    for name, path in BUILTIN_MODELS.items():
        if model_name == path:
            return name
    return os.path.basename(model_name) if is_path(model_name) else model_name


class CannotServe(Exception):
    """The model cannot be served; the message says why, and what to do."""


class ModelUnavailable(CannotServe):
    """The checkpoint can be neither found locally nor downloaded."""


def resolve_model(model=None, model_size="small"):
    """The name or path to load: ``--model`` (a built-in name, a Hugging
    Face id or a path) wins over ``--model-size``."""
    if model:
        return BUILTIN_MODELS.get(model, model)
    try:
        return MODEL_SIZES[model_size]
    except KeyError:
        raise ValueError("unknown model size %r (choose from %s)"
                         % (model_size, ", ".join(sorted(MODEL_SIZES))))


def is_path(name):
    return name.endswith(".nemo") or os.path.exists(os.path.expanduser(name))


def unavailable_message(name, cause):
    from huggingface_hub import constants

    hub = constants.HF_HUB_CACHE
    return (
        "cannot load model %s: it is not in the Hugging Face cache (%s) and could "
        "not be downloaded (%s). Run once with internet access to cache it, point "
        "HF_HOME or HF_HUB_CACHE at a cache that holds it, pass "
        "--model /path/to/model.nemo, or serve the built-in demo model, which "
        "needs no download: --model demo." % (name, hub, cause))


def check_reachable(name):
    """Fail in seconds, before NeMo is imported, when name is a Hugging Face
    id that is neither in the cache nor reachable: raises ModelUnavailable.
    A path, or an id with a snapshot in the cache, passes unchecked."""
    if is_path(name) or "/" not in name:
        return
    from huggingface_hub import HfApi, constants

    folder = os.path.join(constants.HF_HUB_CACHE, "models--" + name.replace("/", "--"),
                          "snapshots")
    if os.path.isdir(folder) and os.listdir(folder):
        return
    if constants.HF_HUB_OFFLINE:
        raise ModelUnavailable(unavailable_message(name, "HF_HUB_OFFLINE is set"))
    try:
        HfApi().model_info(name, timeout=10)
    except Exception as e:
        raise ModelUnavailable(unavailable_message(name, one_line(e)))


def one_line(exc):
    text = str(exc).strip().splitlines()
    return "%s: %s" % (type(exc).__name__, text[0] if text else "")
