"""A real nginx on loopback, as the upstream of the compatibility suite: static files (ranges,
conditional requests, gzip), the redirects nginx makes itself, and a small body limit."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path

from tests.helpers import free_port

#: the static file the suite fetches, and its text
HELLO = "hello from nginx\n" * 64


def _config(work: Path, port: int) -> str:
    return f"""
worker_processes 1;
daemon off;
master_process off;
user root;
error_log {work}/error.log warn;
pid {work}/nginx.pid;
events {{ worker_connections 256; }}
http {{
  access_log off;
  client_body_temp_path {work}/body; proxy_temp_path {work}/proxy;
  fastcgi_temp_path {work}/fcgi; uwsgi_temp_path {work}/uwsgi; scgi_temp_path {work}/scgi;
  types {{ text/plain txt; text/html html; }}
  gzip on; gzip_types text/plain; gzip_min_length 1; gzip_vary on;
  server {{
    listen 127.0.0.1:{port};
    root {work}/www;
    location = /redirect {{ return 301 /files/hello.txt; }}
    location = /method {{ default_type text/plain; return 200 "$request_method"; }}
    location = /upload {{
      client_max_body_size 1k;
      default_type text/plain;
      if ($request_method = POST) {{ return 200 "stored"; }}
    }}
  }}
}}
"""


class Nginx:
    """nginx serving ``www/`` on a free loopback port; :meth:`stop` ends it."""

    def __init__(self, work: Path) -> None:
        self.work = work
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        (work / "www" / "files" / "dir").mkdir(parents=True)
        (work / "www" / "files" / "hello.txt").write_text(HELLO)
        (work / "www" / "files" / "dir" / "index.html").write_text("<p>index</p>\n")
        (work / "www" / "upload").write_text("upload here\n")
        (work / "nginx.conf").write_text(_config(work, self.port))
        binary = shutil.which("nginx") or "/usr/sbin/nginx"
        self.process = subprocess.Popen(  # noqa: S603 - our own argv
            [binary, "-c", str(work / "nginx.conf")],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return
            except OSError:
                if self.process.poll() is not None:
                    break
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"nginx did not start: {(work / 'error.log').read_text()}")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
