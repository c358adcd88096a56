"""`python -m rsafe_proxy.train ...`: the train command on its own."""

from rsafe_proxy.train.command import main

raise SystemExit(main())
