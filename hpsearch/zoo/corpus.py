"""Command line for the embedded corpus (the corpus itself is documented in ``_corpus``).

    python -m hpsearch.zoo.corpus            # print the splits' sizes and verify the sha256
    python -m hpsearch.zoo.corpus --build    # rebuild data/pystdlib-3.11.7.json.xz (3.11.7 only)
"""

import sys

from hpsearch.zoo._corpus import main

if __name__ == "__main__":
    sys.exit(main())
