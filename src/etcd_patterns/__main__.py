"""``python -m etcd_patterns``: the command line, as `etcd-patterns`."""

import sys

from .cli import main

sys.exit(main())
