"""Suite-wide configuration: hypothesis profiles and shared fixtures."""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

# A real Mosquitto broker the test can kill and restart.
from tests.fixtures_mqtt import mosquitto  # noqa: F401

# Real runtimes (Podman service, libvirt test driver) for the driver tests.
from tests.fixtures_runtime import libvirt_uri, podman_owner, podman_service  # noqa: F401

# "ci" keeps the example counts the tests ask for (>= 200 for properties) and
# drops the per-example deadline: the machine is shared and noisy.
settings.register_profile(
    "ci", deadline=None, suppress_health_check=[HealthCheck.too_slow], print_blob=True
)
settings.register_profile("dev", deadline=None, max_examples=50)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
