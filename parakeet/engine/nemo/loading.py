"""
Loading a checkpoint with nemo_toolkit's own loaders, and keeping NeMo's
logging to its errors.

NeMo 3.0 unpacks a ``.nemo`` file with ``tarfile``'s ``filter="data"``,
which Python has only since 3.10.12 and 3.11.4: on older ones, Debian 12's
Python 3.11.2 among them, every checkpoint fails to load ("extract() got an
unexpected keyword argument 'filter'").  There the file is unpacked here,
under the same rule NeMo's own extraction applies (regular files and
directories, all inside the target), and NeMo restores from the unpacked
directory (``SaveRestoreConnector.model_extracted_dir``).
"""

import atexit
import os
import shutil
import tarfile
import tempfile

from ...checkpoints import ModelUnavailable, is_path, one_line, unavailable_message

#: Whether this Python's tarfile takes extraction filters, as NeMo asks.
TARFILE_FILTERS = hasattr(tarfile, "data_filter")


def quiet_nemo():
    """NeMo logs every detail of model loading at INFO, and its telemetry
    package warns that it is off; keep their errors only."""
    import logging

    logging.getLogger("nv_one_logger").setLevel(logging.ERROR)
    from nemo.utils import logging as nemo_logging

    nemo_logging.setLevel(logging.ERROR)


def unpack(path):
    """The .nemo file at path unpacked into a new directory, removed when the
    process exits (the model's tokenizer files are read from it)."""
    folder = os.path.realpath(tempfile.mkdtemp(prefix="parakeet-model-"))
    atexit.register(shutil.rmtree, folder, True)
    with tarfile.open(path) as tar:
        for member in tar.getmembers():
            target = os.path.realpath(os.path.join(folder, member.name))
            if (not (member.isfile() or member.isdir())
                    or os.path.commonpath([target, folder]) != folder):
                raise ValueError("unsafe member %r in %s" % (member.name, path))
            tar.extract(member, folder, set_attrs=False)
    return folder


def load_asr_model(name, map_location, unpacked=not TARFILE_FILTERS):
    """Load a NeMo ASR model by Hugging Face id or local ``.nemo`` path.

    Raises :class:`ModelUnavailable` with a one-line explanation when the
    weights are neither on disk nor downloadable.  unpacked: unpack the
    file here (see above) instead of in NeMo.
    """
    from nemo.collections.asr.models import ASRModel

    if is_path(name):
        path = os.path.expanduser(name)
        if not os.path.isfile(path):
            raise ModelUnavailable("cannot load model %s: no such file" % (name,))
    else:
        try:
            if not unpacked:
                return ASRModel.from_pretrained(name, map_location=map_location).eval()
            path = ASRModel.from_pretrained(name, return_model_file=True)
        except Exception as e:
            raise ModelUnavailable(unavailable_message(name, one_line(e)))
    try:
        if unpacked:
            from nemo.core.connectors.save_restore_connector import SaveRestoreConnector

            connector = SaveRestoreConnector()
            connector.model_extracted_dir = unpack(path)
            model = ASRModel.restore_from(path, map_location=map_location,
                                          save_restore_connector=connector)
        else:
            model = ASRModel.restore_from(path, map_location=map_location)
    except Exception as e:
        raise ModelUnavailable("cannot load model %s: not a usable .nemo "
                               "checkpoint (%s)" % (name, one_line(e)))
    return model.eval()
