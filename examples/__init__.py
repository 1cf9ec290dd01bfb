"""Examples that run as code (``examples.selectors``: a Best-of-N score of your own)."""
