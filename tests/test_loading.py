"""
Loading checkpoints (:mod:`parakeet.engine.nemo.loading`) and the check of
the installed nemo_toolkit (:mod:`parakeet.engine.nemo`).
"""

import io
import os
import tarfile

import torch
from twisted.trial import unittest

from parakeet.checkpoints import ModelUnavailable
from parakeet.engine import nemo
from parakeet.engine.nemo.loading import load_asr_model, unpack

from .support.models import tiny_model_path


def _tar(path, members):
    """A tar file at path of (TarInfo, bytes or None) members."""
    with tarfile.open(path, "w") as tar:
        for info, data in members:
            if data is not None:
                info.size = len(data)
            tar.addfile(info, None if data is None else io.BytesIO(data))
    return path


class LoadingTests(unittest.TestCase):

    def test_missing_model_file(self):
        with self.assertRaises(ModelUnavailable) as caught:
            load_asr_model("/nonexistent/model.nemo", "cpu")
        self.assertEqual(str(caught.exception),
                         "cannot load model /nonexistent/model.nemo: no such file")

    def test_not_a_model_file(self):
        with open("junk.nemo", "wb") as f:
            f.write(b"not a tar archive")
        for unpacked in (False, True):
            with self.assertRaises(ModelUnavailable) as caught:
                load_asr_model("junk.nemo", "cpu", unpacked=unpacked)
            self.assertIn("cannot load model junk.nemo: not a usable .nemo checkpoint",
                          str(caught.exception))

    def test_unpacked_here_loads_the_same_model(self):
        # The way a .nemo loads on Pythons whose tarfile has no extraction
        # filters (Debian 12's 3.11.2): the same weights and tokenizer.
        path = tiny_model_path()
        theirs = load_asr_model(path, "cpu", unpacked=False)
        ours = load_asr_model(path, "cpu", unpacked=True)
        self.assertEqual(ours.tokenizer.vocab, theirs.tokenizer.vocab)
        mine, other = ours.state_dict(), theirs.state_dict()
        self.assertEqual(sorted(mine), sorted(other))
        for name, value in other.items():
            self.assertTrue(torch.equal(mine[name], value), name)

    def test_unpack_refuses_what_leaves_the_folder(self):
        link = tarfile.TarInfo("model_config.yaml")
        link.type = tarfile.SYMTYPE
        link.linkname = "/etc/passwd"
        for name, members in [
                ("up", [(tarfile.TarInfo("../escaped.txt"), b"x")]),
                ("absolute", [(tarfile.TarInfo("/tmp/escaped.txt"), b"x")]),
                ("link", [(link, None)])]:
            path = _tar(os.path.abspath(name + ".nemo"), members)
            with self.assertRaises(ValueError) as caught:
                unpack(path)
            self.assertIn("unsafe member", str(caught.exception))
        self.assertFalse(os.path.exists(os.path.abspath("escaped.txt")))

    def test_unpack(self):
        path = _tar(os.path.abspath("plain.nemo"),
                    [(tarfile.TarInfo("./model_config.yaml"), b"a: 1\n")])
        folder = unpack(path)
        with open(os.path.join(folder, "model_config.yaml")) as f:
            self.assertEqual(f.read(), "a: 1\n")


class VersionTests(unittest.TestCase):

    def test_tested_version_passes(self):
        nemo.check_version(nemo.TESTED[0], environ={})

    def test_installed_version_is_tested(self):
        # What importing the package checked; the pin in setup.py agrees.
        nemo.check_version(environ={})

    def test_untested_version_fails_clearly(self):
        with self.assertRaises(nemo.UntestedNeMo) as caught:
            nemo.check_version("3.9.0", environ={})
        self.assertEqual(
            str(caught.exception),
            "nemo_toolkit 3.9.0 is installed, but parakeet-server's adaptation of NeMo "
            "(parakeet/engine/nemo) is tested with 3.0.0 only: install "
            "'nemo_toolkit[asr]==3.0.0', or set PARAKEET_UNTESTED_NEMO=1 to try this "
            "version anyway")

    def test_override_warns(self):
        nemo.check_version("3.9.0", environ={"PARAKEET_UNTESTED_NEMO": "1"})
        warnings = self.flushWarnings([nemo.check_version])
        self.assertEqual(len(warnings), 1)
        self.assertIn("nemo_toolkit 3.9.0 is installed", warnings[0]["message"])
