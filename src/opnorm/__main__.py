"""``python -m opnorm ...`` (and ``torchrun -m opnorm ...``): the ``opnorm`` command line."""

from opnorm.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
