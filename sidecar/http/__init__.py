"""HTTP/1.1 bytes on llhttp: the :8080 server (``server``) and its connections (``connection``),
one exchange's parts (``exchange``), framing (``wire``), the upstream client pool (``client``) and
connection (``client_conn``), egress proxies (``egress``) and the unix socket listener
(``unix_socket``). Knows no token and no policy."""
