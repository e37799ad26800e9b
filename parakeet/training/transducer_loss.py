"""
The RNN-T loss, vectorised for training on a CPU.

nemo_toolkit's CPU implementations of the transducer loss walk the (time,
label) lattice in Python (``warprnnt_numba`` on a CPU, and ``pytorch``
through autograd), seconds for a batch that the model itself runs in a
fraction of that.  :class:`TransducerLoss` computes the same loss with one
vectorised update per encoder frame: within a frame, the forward variable
along the label axis is a log-semiring prefix sum,

    alpha[t, u] = C[u] + logcumsumexp_k (alpha[t-1, k] + blank[t-1, k] - C[k]),

where C[u] is the sum of the label log-probabilities emitted at frame t
before label u, so a frame costs a handful of tensor operations and autograd
gives the gradient.  It is a drop-in for NeMo's ``RNNTLoss`` module during
training (same call, per-batch mean of per-utterance losses).
"""

import torch


def transducer_nll(logits, targets, frame_lengths, target_lengths, blank):
    """Per-utterance negative log-likelihood.

    logits: [B, T, U + 1, V] joint outputs (log-softmax is applied here);
    targets: [B, U] label ids; frame_lengths, target_lengths: [B].
    """
    log_probs = torch.log_softmax(logits.to(torch.float64), dim=-1)
    batch, frames, labels_plus_one, _ = log_probs.shape
    blank_lp = log_probs[..., blank]                                   # [B, T, U+1]
    index = targets[:, None, :labels_plus_one - 1, None].long().expand(
        batch, frames, labels_plus_one - 1, 1)
    label_lp = log_probs[:, :, :-1].gather(3, index).squeeze(3)        # [B, T, U]
    # C[t, u] = sum of label log-probs at frame t before label u.
    prefix = torch.cat([log_probs.new_zeros(batch, frames, 1),
                        label_lp.cumsum(dim=2)], dim=2)                # [B, T, U+1]
    start = log_probs.new_full((batch, labels_plus_one), float("-inf"))
    start[:, 0] = 0.0
    alphas = []
    carried = start
    for t in range(frames):
        alpha = prefix[:, t] + torch.logcumsumexp(carried - prefix[:, t], dim=1)
        alphas.append(alpha)
        carried = alpha + blank_lp[:, t]
    alphas = torch.stack(alphas, dim=1)                                # [B, T, U+1]
    rows = torch.arange(batch, device=logits.device)
    last_t = frame_lengths.long() - 1
    last_u = target_lengths.long()
    total = alphas[rows, last_t, last_u] + blank_lp[rows, last_t, last_u]
    return -total


class TransducerLoss(torch.nn.Module):
    """Mean over the batch of the per-utterance transducer loss."""

    def __init__(self, blank):
        super().__init__()
        self.blank = blank

    def forward(self, log_probs, targets, input_lengths, target_lengths):
        nll = transducer_nll(log_probs, targets, input_lengths, target_lengths,
                             self.blank)
        return nll.mean().to(log_probs.dtype)
