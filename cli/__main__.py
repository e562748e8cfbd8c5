import sys

from pum.cli import main

sys.exit(main())
