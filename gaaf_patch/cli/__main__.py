"""``python -m gaaf_patch.cli``: the ``gaaf-patch`` command (also what ``torchrun -m gaaf_patch.cli`` starts)."""

import sys

from .app import main

sys.exit(main())
