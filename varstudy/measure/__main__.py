"""``python -m varstudy.measure``."""

from varstudy.measure.command import main

raise SystemExit(main())
