"""``python -m ssmkernels <command>``: see ``ssmkernels.cli``."""
from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
