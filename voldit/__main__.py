import sys

from voldit.cli import main

sys.exit(main())
