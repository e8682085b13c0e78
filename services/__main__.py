import sys

from services.launch import main

sys.exit(main())
