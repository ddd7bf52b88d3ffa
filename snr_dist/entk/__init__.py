"""The empirical NTK toolkit: exact and Nystrom kernels, trace estimators, target spectra.

Litman & Guo's picture: the ENTK's top eigenspace is a "signal channel" where clean targets
live and are fitted fast; label noise spreads into the low-eigenvalue "reservoir" and is
fitted slowly. These tools measure that on a real model (see ``docs/entk.md``):

- `entk`, `entk_matvec`, `eigh_desc` (`snr_dist.entk.kernel`): the exact kernel and
  Jacobian-free products with it;
- `nystrom_entk` (`snr_dist.entk.nystrom`): a low-rank kernel from landmark examples;
- `hutchinson`, `hutchpp`, `entk_trace` (`snr_dist.entk.trace`): ``tr(K)`` from products;
- `target_spectrum`, `record`, `ENTKCallback` (`snr_dist.entk.spectrum`): where clean targets
  and label noise sit in the eigenbasis;
- `plot_cumulative` (`snr_dist.entk.plot`): the energy curves as a PNG.

The maths imports no training code; `snr_dist.experiments.entk_run` is the ``snr-dist entk``
job built on it.
"""

from snr_dist.entk.kernel import MODES, eigh_desc, entk, entk_matvec, full_to_matrix, jacobian
from snr_dist.entk.nystrom import NystromENTK, choose_landmarks, nystrom, nystrom_entk
from snr_dist.entk.plot import plot_cumulative
from snr_dist.entk.spectrum import ENTKCallback, TargetSpectrum, record, target_spectrum
from snr_dist.entk.trace import TraceEstimate, entk_trace, hutchinson, hutchpp, rademacher

__all__ = [
    "MODES",
    "ENTKCallback",
    "NystromENTK",
    "TargetSpectrum",
    "TraceEstimate",
    "choose_landmarks",
    "eigh_desc",
    "entk",
    "entk_matvec",
    "entk_trace",
    "full_to_matrix",
    "hutchinson",
    "hutchpp",
    "jacobian",
    "nystrom",
    "nystrom_entk",
    "plot_cumulative",
    "rademacher",
    "record",
    "target_spectrum",
]
