"""The configuration as data: the models (``models``; what sections share, ``sections``; the
``identity`` union of one model per kind, ``identity``, with the kinds' own ``oauth2`` and
``json_login``; ``headers``, ``callers``), reading a file (``load``) and the key reference generated
from the fields' descriptions (``reference``). Imports neither ``identity`` nor ``store``: checks
that need those run from the composition root (:mod:`sidecar.checks`)."""
