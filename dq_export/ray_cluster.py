"""Ray is optional: import it or say how to install it, and join a cluster or start one.

dq-export's, dq-serve's and the benchmarks' ``--ray`` flags share this, so a missing Ray is
the same one-line error everywhere and an address means the same thing everywhere.
"""

from __future__ import annotations

from dq_export.errors import UserError

INSTALL = "pip install -e '.[ray]' (or pip install 'ray[serve]')"


def require_ray(flag: str = "--ray"):
    """The ``ray`` module, or a UserError naming the flag and how to install Ray."""
    try:
        import ray
    except ImportError:
        raise UserError(f"{flag} needs Ray, which is not installed: {INSTALL}") from None
    return ray


def connect(address: str | None = None, flag: str = "--ray"):
    """Ray, connected. ``address`` None or "auto": the cluster that ``ray start`` runs on this
    machine (or $RAY_ADDRESS), else a new local one that ends with this process; otherwise
    that cluster (``ray://HOST:10001``, or ``HOST:6379`` from inside it). A process already
    connected stays on its cluster."""
    ray = require_ray(flag)
    if not ray.is_initialized():
        try:
            ray.init(address=None if address in (None, "auto") else address,
                     log_to_driver=False)
        except (ConnectionError, ValueError) as e:
            raise UserError(f"cannot reach the Ray cluster at {address}: "
                            f"{str(e).splitlines()[0]}") from None
    return ray
