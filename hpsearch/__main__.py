"""``python -m hpsearch``: see :mod:`hpsearch.app`."""

from hpsearch.app import main

if __name__ == "__main__":
    main()
