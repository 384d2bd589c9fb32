"""``python -m varstudy.finetune``."""

from varstudy.finetune import main

raise SystemExit(main())
