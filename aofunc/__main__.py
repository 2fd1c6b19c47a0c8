"""``python -m aofunc``: see ``python -m aofunc --help``."""
import sys

from aofunc.cli.main import main

sys.exit(main())
