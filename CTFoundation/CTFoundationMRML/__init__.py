"""MRML conversions of the CTFoundation module kept apart from CTFoundation.py (one file per feature)."""
