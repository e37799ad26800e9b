"""
parakeet.training.transducer_loss against nemo_toolkit's reference RNN-T loss.
"""

import torch
from twisted.trial import unittest

from nemo.collections.asr.losses.rnnt_pytorch import RNNTLossPytorch

from parakeet.training.transducer_loss import TransducerLoss, transducer_nll


def reference(logits, targets, frames, labels, blank):
    loss = RNNTLossPytorch(blank=blank, reduction="none")
    return loss(acts=torch.log_softmax(logits, -1), labels=targets,
                act_lens=frames, label_lens=labels)


class TransducerLossTests(unittest.TestCase):

    def check(self, batch, frames, labels, vocab, seed):
        generator = torch.Generator().manual_seed(seed)
        logits = torch.randn(batch, frames, labels + 1, vocab, generator=generator,
                             dtype=torch.float64, requires_grad=True)
        targets = torch.randint(0, vocab - 1, (batch, labels), generator=generator)
        frame_lengths = torch.randint(1, frames + 1, (batch,), generator=generator)
        frame_lengths[0] = frames
        label_lengths = torch.randint(0, labels + 1, (batch,), generator=generator)
        label_lengths[0] = labels
        blank = vocab - 1
        ours = transducer_nll(logits, targets, frame_lengths, label_lengths, blank)
        theirs = reference(logits, targets, frame_lengths, label_lengths, blank)
        self.assertTrue(torch.allclose(ours, theirs.to(ours.dtype), rtol=1e-7, atol=1e-7),
                        (ours, theirs))
        ours_grad, = torch.autograd.grad(ours.sum(), logits)
        theirs_grad, = torch.autograd.grad(theirs.sum(), logits)
        self.assertTrue(torch.allclose(ours_grad, theirs_grad.to(ours_grad.dtype),
                                       atol=1e-7))
        self.assertFalse(torch.isnan(ours_grad).any())

    def test_matches_reference(self):
        for seed, shape in enumerate([(1, 1, 0, 3), (1, 4, 1, 3), (3, 7, 4, 6),
                                      (4, 12, 5, 9), (2, 3, 6, 5)]):
            self.check(*shape, seed=seed)

    def test_module_is_the_batch_mean(self):
        logits = torch.randn(3, 5, 3, 4)
        targets = torch.randint(0, 3, (3, 2))
        frames, labels = torch.tensor([5, 4, 2]), torch.tensor([2, 1, 0])
        loss = TransducerLoss(blank=3)(log_probs=logits, targets=targets,
                                       input_lengths=frames, target_lengths=labels)
        self.assertEqual(loss.dtype, torch.float32)
        expected = transducer_nll(logits, targets, frames, labels, 3).mean()
        self.assertAlmostEqual(loss.item(), expected.item(), places=5)
