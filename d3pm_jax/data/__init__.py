"""Layer 5, the corpora: readers and preparers, tokenizers, the prepared on-disk format and the input pipeline.
May import the math, ``runtime`` and ``config``; never ``training``, ``evaluation`` or ``cli``."""
