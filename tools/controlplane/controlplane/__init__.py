"""A local, real Kubernetes control plane for end-to-end tests and demos.

etcd plus a CRD-capable Kubernetes API server (../main/*.go: apiextensions-apiserver with a
minimal core/v1), built from Debian sid's packaged Go sources. Nothing is installed into
the system: packages are fetched with a private apt configuration and unpacked with
``dpkg-deb -x`` into a cache outside the repository:

    ${XDG_CACHE_HOME:-~/.cache}/imageunlock/controlplane/

Modules: ``builder`` (packages, Go build, kubectl), ``plane`` (ControlPlane: processes,
certificates, kubeconfigs), ``cli`` (the command line), ``common`` (cache, errors, lock).

Command line (scripts/setup.sh installs this package editable into .venv)::

    python -m controlplane build [--refresh]   # ensure binaries; prints the bin dir
    python -m controlplane up --dir DIR [--audit-log PATH] [--audit-policy PATH]
                           [--authorization-policy PATH] [--timeout SECONDS]
                                               # start detached; prints DIR/kubeconfig
    python -m controlplane down --dir DIR      # stop by PID (idempotent)
    python -m controlplane status --dir DIR    # "running <kubeconfig>" or "stopped"
    python -m controlplane user --dir DIR --name NAME [--group G ...]
                                               # client cert + kubeconfig for another identity
    python -m controlplane kubectl-path        # a working kubectl (PATH, else Debian's)
    python -m controlplane clean               # delete the whole cache

As a library::

    from controlplane import ControlPlane
    cp = ControlPlane(tmpdir)
    cp.start()                 # blocks until /readyz passes (bounded)
    cp.kubeconfig              # path of the admin kubeconfig (O=system:masters)
    cp.add_user("alice", groups=["dev"])   # -> path of a kubeconfig for that identity
    cp.stop()

Standard library only (Python 3.11). Needs apt-get, dpkg and openssl.
"""

from .builder import build, kubectl_path
from .cli import main
from .common import ControlPlaneError, cache_root
from .plane import ControlPlane

__all__ = ["ControlPlane", "ControlPlaneError", "build", "cache_root", "kubectl_path", "main"]
