"""Structured outputs: grammars that constrain what a request may generate (grammar.py) and the tool-call
formats models write (tool_formats.py)."""
