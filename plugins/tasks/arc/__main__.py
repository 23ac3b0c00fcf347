"""`python -m dis_plugins.tasks.arc OUT_DIR [options]`: export ARC data in the TRM/HRM layout."""

import sys

from .reference_layout import main

sys.exit(main())
