"""``python -m qcore ...`` (and ``torchrun ... -m qcore quantize ...``): the ``qcore`` command."""
import sys

from qcore.cli import main

sys.exit(main())
