import sys

from qmace.cli.main import main

sys.exit(main())
