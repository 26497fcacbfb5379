"""The numerics of the guided sampler, apart from Optuna (as Optuna's ``_gp`` package is).

:class:`~amp_search.search.guided.GuidedSampler` only translates trials to arrays and a row
back to parameters; everything here works on assignments as rows of codes (0 FP32, 1 FP16,
2 BF16: 0/1 rows unless the search offers BF16), with numpy only:

- :mod:`.guide`: what the sampler knows before any trial, kept in the study (units, edges,
  the latency model's coefficients, each unit's own FP16 error);
- :mod:`.latency`: :class:`~.latency.LatencySurrogate`, a price for every assignment;
- :mod:`.gp`: :class:`~.gp.DeviationGP`, a Gaussian process on log10 deviation;
- :mod:`.acquisition`: :func:`~.acquisition.expected_hvi`, the expected hypervolume
  improvement, in closed form;
- :mod:`.candidates`: the assignments scored (all, or a pool around the front);
- :mod:`.proposal`: :func:`~.proposal.next_row`, the steps from observations to the next row.
"""

from __future__ import annotations
