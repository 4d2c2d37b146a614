"""Started as a script, the way the DeepSpeed workers are (``python tests/import_probe.py``), so
that ``tests/`` is first on ``sys.path``: imports transformers' hub-kernels integration and builds
a BERT classifier and a Llama decoder. A folder here that shadows a dependency's package fails
this in the import."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import transformers.integrations.hub_kernels  # noqa: E402,F401

from tests.helpers import tiny_decoder, tiny_model  # noqa: E402

bert = tiny_model()
llama = tiny_decoder("student")
print("ok", type(bert).__name__, type(llama).__name__)
