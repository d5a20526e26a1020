"""The configuration as data: the models (``models``), the per-kind parts (``oauth2``,
``json_login``, ``headers``, ``callers``), reading a file (``load``) and the generated key
reference (``reference``). Imports neither ``identity`` nor ``store``: checks that need those run
from the composition root."""
