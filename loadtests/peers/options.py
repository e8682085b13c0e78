"""The command line every peer server takes (the harness starts them: loadtests/peers/__main__.py)."""

from __future__ import annotations

import argparse

ENDPOINTS = ("act", "classify")


def parse(doc: str, argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=doc.split("\n")[0])
    p.add_argument("--endpoint", choices=ENDPOINTS, required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--max-batch", type=int, default=64, help="requests merged into one model call, at most")
    p.add_argument("--wait-ms", type=float, default=0.0, help="extra wait for a batch to fill (where the peer has one)")
    return p.parse_args(argv)
