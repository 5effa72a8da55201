"""Moving dictionaries between saecli and SAELens / sparsify / dictionary_learning, and bringing in
activations computed elsewhere. See formats.py (export/import with the numeric self-check) and
activations.py (arrays or an HF dataset of activations → a saecli cache)."""

from saecli.interop.formats import FORMATS, detect_format, export_dictionary, load_any, read_checked
from saecli.interop.selfcheck import SelfCheckError

__all__ = ["FORMATS", "SelfCheckError", "detect_format", "export_dictionary", "load_any", "read_checked"]
