"""Write ``checkpoint_v0_1.pt``: optimizer checkpoints as snr-dist 0.1.0 wrote them, and how
0.1.0 went on from them, for `tests/test_older_checkpoints.py`.

Run it with snr-dist 0.1.0's package first on the path (commit 8c82152), e.g.::

    git worktree add /tmp/snr-dist-0.1 8c82152
    python tests/data/make_checkpoint_v0_1.py /tmp/snr-dist-0.1

For each optimizer (SNRAdamW diagonal, SNRAdamW subspace, SNRPreconditioner around Adam) a
small MLP takes five steps, its model and optimizer state dicts are saved, then it takes five
more steps, whose parameters are saved as the expected continuation. The diagonal run is also
saved with `snr_dist.checkpoint` (``dcp_v0_1/``, its continuation ``dcp_v0_1_continued.pt``).
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

OPTIMIZERS = ("diagonal", "subspace", "preconditioner")


def model():
    from torch import nn

    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))


def make_optimizer(kind: str, params):
    import torch

    from snr_dist import SNRAdamW, SNRPreconditioner

    if kind == "diagonal":
        return SNRAdamW(params, lr=1e-2, weight_decay=0.1)
    if kind == "subspace":
        return SNRAdamW(params, lr=1e-2, mode="subspace", rank=2, refresh_every=4)
    return SNRPreconditioner(torch.optim.Adam(params, lr=1e-2))


def train(m, opt, steps: range) -> None:
    import torch

    for i in steps:
        x = torch.randn(16, 5, generator=torch.Generator().manual_seed(i))
        opt.zero_grad()
        m(x).pow(2).sum().backward()
        opt.step()


def main(package: str) -> None:
    sys.path.insert(0, package)
    import torch

    import snr_dist

    assert snr_dist.__version__ == "0.1.0", snr_dist.__file__
    out = {"version": snr_dist.__version__}
    for kind in OPTIMIZERS:
        torch.manual_seed(0)
        m = model()
        opt = make_optimizer(kind, m.parameters())
        train(m, opt, range(5))
        # copies: both state dicts hold the live tensors, which the next steps change
        saved = copy.deepcopy({"model": m.state_dict(), "optimizer": opt.state_dict()})
        train(m, opt, range(5, 10))
        out[kind] = {**saved, "continued": m.state_dict()}
    torch.save(out, Path(__file__).with_name("checkpoint_v0_1.pt"))
    # the same diagonal run through snr_dist.checkpoint (DCP: a directory), and how it went on
    from snr_dist import checkpoint

    torch.manual_seed(0)
    m = model()
    opt = make_optimizer("diagonal", m.parameters())
    train(m, opt, range(5))
    checkpoint.save(Path(__file__).with_name("dcp_v0_1"), m, opt, step=5)
    train(m, opt, range(5, 10))
    torch.save(m.state_dict(), Path(__file__).with_name("dcp_v0_1_continued.pt"))


if __name__ == "__main__":
    main(sys.argv[1])
