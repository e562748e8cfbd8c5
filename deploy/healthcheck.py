"""Container health check of the PUM server: exit 0 when GET URL answers 200, else 1.

Usage: python healthcheck.py [URL]      (default http://127.0.0.1:8000/healthz)

Only the standard library (the slim image has no curl). Proxies from the environment are
ignored: this probes the container's own loopback port. An https URL is probed without
verifying the certificate, since that certificate names the public host, not 127.0.0.1;
nothing secret is sent.
"""

from __future__ import annotations

import ssl
import sys
import urllib.request

DEFAULT_URL = "http://127.0.0.1:8000/healthz"


def healthy(url: str, timeout_s: float = 4.0) -> bool:
    """Whether GET `url` answers 200 within `timeout_s` seconds."""
    handlers: list[urllib.request.BaseHandler] = [urllib.request.ProxyHandler({})]
    if url.startswith("https:"):
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        handlers.append(urllib.request.HTTPSHandler(context=context))
    try:
        with urllib.request.build_opener(*handlers).open(url, timeout=timeout_s) as response:
            return response.status == 200
    except Exception:  # refused, reset, timeout, TLS mismatch, bad status line: all mean "not healthy"
        return False


def main(argv: list[str]) -> int:
    url = argv[1] if len(argv) > 1 else DEFAULT_URL
    return 0 if healthy(url) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
