"""The proxy's policy: what one caller's request becomes upstream (``forward``), the managed
header rules (``headers``) and values (``header_values``), the caller checks (``callers``) and
tracing (``tracing``)."""
