"""Cross-disciplinary science: one module per chapter of the part *Cross-disciplinary science*."""
