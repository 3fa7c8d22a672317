"""``python -m lmtop``: the ``lmtop`` command.

``lmtop`` is a namespace package (the repository's ``hooks/`` and ``tui/`` install as
``lmtop.hooks`` and ``lmtop.tui``); this file is its one module of its own, with no
``__init__.py``, so nothing else is installed at the top of ``lmtop``.
"""

import sys

from lmtop.tui.cli import main

sys.exit(main())
