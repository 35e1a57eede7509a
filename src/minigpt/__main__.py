"""`python -m minigpt` == the `minigpt` command."""

import sys

from .cli import main

sys.exit(main())
