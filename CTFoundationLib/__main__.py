import sys

from CTFoundationLib.cli import main

sys.exit(main())
