"""Allow ``python -m novacron``."""

from novacron.cli import run

run()
