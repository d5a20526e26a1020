"""The session wing: the manager (``manager``) that owns one identity's session, its refresh
schedule (``schedule``) and timing maths (``timing``), the renewal (``renew``), persistence
(``persist``), the status report (``report``), coordination between replicas (``shared``) and the
token file sink (``sink``).

Only the manager holds the session. The other parts are given plain values (rules, times, tokens,
records, a store, a ``renew`` callable) and return them; the manager installs what they return."""
