"""The command line: ``python -m controlplane build|up|down|status|user|kubectl-path|clean``."""

from __future__ import annotations

import argparse
import shutil
import sys

from .builder import build, kubectl_path
from .common import ControlPlaneError, cache_root
from .plane import ControlPlane

DESCRIPTION = "A local, real Kubernetes control plane for end-to-end tests and demos."


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m controlplane", description=DESCRIPTION)
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="ensure binaries; print their directory")
    b.add_argument("--refresh", action="store_true", help="re-read Debian sid and rebuild if versions changed")
    u = sub.add_parser("up", help="start etcd + API server detached; print the kubeconfig path")
    u.add_argument("--dir", required=True)
    u.add_argument("--audit-log", help="audit log path (a Metadata-level policy is used unless --audit-policy)")
    u.add_argument("--audit-policy", help="audit policy file (log defaults to DIR/audit.log)")
    u.add_argument("--authorization-policy", help="RBAC YAML for non-system:masters users (see main/authz.go)")
    u.add_argument("--timeout", type=float, default=60)
    d = sub.add_parser("down", help="stop the processes started by `up` (by PID)")
    d.add_argument("--dir", required=True)
    s = sub.add_parser("status", help="print 'running KUBECONFIG' or 'stopped'")
    s.add_argument("--dir", required=True)
    us = sub.add_parser("user", help="mint a client cert + kubeconfig for another identity")
    us.add_argument("--dir", required=True)
    us.add_argument("--name", required=True, help="user name (certificate CN)")
    us.add_argument("--group", action="append", default=[], help="group (certificate O); repeatable")
    sub.add_parser("kubectl-path", help="print a working kubectl")
    sub.add_parser("clean", help="delete the build cache")
    args = ap.parse_args(argv)

    try:
        if args.cmd == "build":
            print(build(refresh=args.refresh))  # the bin dir also holds Debian's kubectl
        elif args.cmd == "up":
            cp = ControlPlane(
                args.dir,
                audit_log=args.audit_log,
                audit_policy=args.audit_policy,
                authorization_policy=args.authorization_policy,
            )
            cp.start(timeout=args.timeout)
            print(cp.kubeconfig)
        elif args.cmd == "down":
            ControlPlane(args.dir).stop()
        elif args.cmd == "status":
            cp = ControlPlane(args.dir)
            up = cp.running() and cp._ready()
            print(f"running {cp.kubeconfig}" if up else "stopped")
            return 0 if up else 1
        elif args.cmd == "user":
            print(ControlPlane(args.dir).add_user(args.name, args.group))
        elif args.cmd == "kubectl-path":
            print(kubectl_path())
        elif args.cmd == "clean":
            shutil.rmtree(cache_root(), ignore_errors=True)
    except ControlPlaneError as e:
        print(f"controlplane: error: {e}", file=sys.stderr)
        return 1
    return 0
