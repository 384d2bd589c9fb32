"""``python -m varstudy.measure``."""

from varstudy.measure import main

raise SystemExit(main())
