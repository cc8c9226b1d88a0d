import sys

from keye_train.cli.main import main

sys.exit(main())
