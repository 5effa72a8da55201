"""saecli: train and study sparse dictionaries on language-model activations."""

__version__ = "0.1.0"
