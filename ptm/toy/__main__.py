"""`python -m ptm.toy OUT_DIR [--seed N] [--size NAME=N ...]`: generate the built-in toy suite."""

import sys

from ptm.toy.commands import main

sys.exit(main())
