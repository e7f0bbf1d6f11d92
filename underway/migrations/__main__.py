"""``python -m underway.migrations``: apply pending migrations (see :func:`main`)."""

import sys

from . import main

sys.exit(main())
