"""`atlas-operator`: run the AtlasEndpoint operator (kopf) in or out of a cluster.

More than one replica: kopf's peering pauses every operator while one with a higher
priority is alive, and freezes all of them on a tie. So each replica draws a distinct
random priority unless one is given: exactly one replica (the highest) works, the others
stand by and take over when its peering heartbeat stops. `--standalone` skips peering
(one replica, or no kopf peering CRD installed).
"""

from __future__ import annotations

import argparse
import os
import secrets

import kopf


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    env = os.environ.get
    parser = argparse.ArgumentParser(prog="atlas-operator", description=__doc__.splitlines()[0])
    parser.add_argument("-n", "--namespace", action="append", default=[],
                        help="watch only this namespace (repeatable); default: all namespaces")
    parser.add_argument("--peering", default=env("ATLAS_PEERING_NAME", "atlas-operator"),
                        help="kopf peering object shared by the replicas")
    parser.add_argument("--standalone", action="store_true",
                        default=env("ATLAS_STANDALONE", "") in ("1", "true"),
                        help="no peering: only safe with a single replica")
    parser.add_argument("--priority", type=int, default=None,
                        help="peering priority; default: random, so replicas never tie")
    parser.add_argument("--liveness", default=env("ATLAS_LIVENESS", "http://0.0.0.0:8080/healthz"),
                        help="kopf's liveness endpoint (the chart's probes use it)")
    parser.add_argument("-v", "--verbose", action="store_true")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from atlas_operator import handlers  # registers the handlers with kopf

    handlers.scan_cluster = not args.namespace

    kopf.configure(verbose=args.verbose)
    priority = args.priority if args.priority is not None else 1 + secrets.randbelow(2**30)
    kopf.run(
        clusterwide=not args.namespace,
        namespaces=args.namespace,
        standalone=args.standalone,
        priority=priority,
        # kopf makes peering mandatory whenever a name is given, even with standalone=True.
        peering_name=None if args.standalone else args.peering,
        liveness_endpoint=args.liveness or None,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
