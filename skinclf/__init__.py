"""skinclf: batch classification of dermoscopic skin-lesion images.

Decision support for clinicians, not a diagnosis.
"""

__version__ = "0.1.0"

KAGGLE_DATASET = "kmader/skin-cancer-mnist-ham10000"
HAM10000_CLASSES = ("akiec", "bcc", "bkl", "df", "mel", "nv", "vasc")
