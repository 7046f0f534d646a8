"""llava-trim: LLaVA-1.5 with TRIM token reduction as a transformers model repository.

The three `*_llava_trim.py` modules are the code that travels with every converted checkpoint; this package
only makes them (and the tools beside them) importable as `llava_trim.*` after `pip install`.
"""

__version__ = "0.1.0"
