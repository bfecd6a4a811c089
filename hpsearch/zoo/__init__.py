"""The model zoo: the embedded default model and the corpus it was trained on.

``EMBEDDED_NAME`` is what users put in ``model.name_or_path`` to get the embedded default model,
a small Llama trained by :mod:`hpsearch.zoo.train` on the corpus of :mod:`hpsearch.zoo._corpus`;
the engine maps it to ``EMBEDDED_DIR``, which ``AutoModelForCausalLM.from_pretrained`` and
``AutoTokenizer.from_pretrained`` load offline. Importing this package loads neither torch nor
transformers.
"""

import pathlib

from hpsearch.zoo._corpus import corpus_sha256, load_files, load_split

__all__ = ["EMBEDDED_DIR", "EMBEDDED_NAME", "corpus_sha256", "load_files", "load_split"]

EMBEDDED_DIR: pathlib.Path = pathlib.Path(__file__).parent / "embedded"
EMBEDDED_NAME = "hpsearch/embedded-llama"
