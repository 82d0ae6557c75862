"""Simulated XLA:CPU devices for the benchmark scripts that compile for a device mesh.

Not part of rljax; imports neither jax nor numpy, so a script can call it before jax is
imported (XLA reads ``XLA_FLAGS`` once, when its CPU client starts).
"""

from __future__ import annotations

import os
import sys


def simulate_host_devices(needed: int) -> None:
    """Make XLA:CPU expose ``needed`` devices (harmless where real accelerators are used),
    unless jax is already imported, ``XLA_FLAGS`` already asks for a count, or one device is
    enough."""
    flags = os.environ.get("XLA_FLAGS", "")
    if "jax" in sys.modules or "xla_force_host_platform_device_count" in flags or needed <= 1:
        return
    os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={needed}".strip()
