import sys

from tinyserve.server import main

sys.exit(main())
