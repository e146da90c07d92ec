"""spacy-ocrneurons: robust NER on OCR'd historical documents, with OCR-sensitive neuron neutralization."""

__version__ = "0.1.0"

from .profile import NeutralizationProfile, ProfileError  # noqa: E402,F401

__all__ = ["NeutralizationProfile", "ProfileError", "OcrNeuronsNER", "__version__"]


def __getattr__(name):  # lazy: importing the package must not import torch-heavy modules
    if name == "OcrNeuronsNER":
        from .component import OcrNeuronsNER

        return OcrNeuronsNER
    raise AttributeError(name)
