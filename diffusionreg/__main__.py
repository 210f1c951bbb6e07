"""``python -m diffusionreg``: the same as the ``diffusionreg`` console script."""

from diffusionreg.cli import main

raise SystemExit(main())
