import sys

from drpruning.cli import main

sys.exit(main())
