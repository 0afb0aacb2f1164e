"""``python -m dist_pgkm.cli``: the same as the ``dist-pgkm`` command."""

import sys

from dist_pgkm.cli import main

sys.exit(main())
