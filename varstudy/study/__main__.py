"""``python -m varstudy.study``."""

from varstudy.study import main

raise SystemExit(main())
