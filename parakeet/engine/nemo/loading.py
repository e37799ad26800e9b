"""
Loading a checkpoint with nemo_toolkit's own loaders, and keeping NeMo's
logging to its errors.
"""

import os

from ...checkpoints import ModelUnavailable, is_path, one_line, unavailable_message


def quiet_nemo():
    """NeMo logs every detail of model loading at INFO, and its telemetry
    package warns that it is off; keep their errors only."""
    import logging

    logging.getLogger("nv_one_logger").setLevel(logging.ERROR)
    from nemo.utils import logging as nemo_logging

    nemo_logging.setLevel(logging.ERROR)


def load_asr_model(name, map_location):
    """Load a NeMo ASR model by Hugging Face id or local ``.nemo`` path.

    Raises :class:`ModelUnavailable` with a one-line explanation when the
    weights are neither on disk nor downloadable.
    """
    from nemo.collections.asr.models import ASRModel

    if is_path(name):
        path = os.path.expanduser(name)
        if not os.path.isfile(path):
            raise ModelUnavailable("cannot load model %s: no such file" % (name,))
        try:
            model = ASRModel.restore_from(path, map_location=map_location)
        except Exception as e:
            raise ModelUnavailable("cannot load model %s: not a usable .nemo "
                                   "checkpoint (%s)" % (name, one_line(e)))
    else:
        try:
            model = ASRModel.from_pretrained(name, map_location=map_location)
        except Exception as e:
            raise ModelUnavailable(unavailable_message(name, one_line(e)))
    model.eval()
    return model
