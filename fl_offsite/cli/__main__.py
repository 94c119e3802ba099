"""``python -m fl_offsite.cli``: the ``fl-offsite`` command line."""
import sys

from fl_offsite.cli.main import main

sys.exit(main())
