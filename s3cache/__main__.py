import sys

from s3cache.cli import main

sys.exit(main())
