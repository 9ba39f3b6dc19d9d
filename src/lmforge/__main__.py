"""`python -m lmforge` and `torchrun -m lmforge`: hand over to the command line."""

from lmforge.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
