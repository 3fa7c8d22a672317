"""The viewing side of lmtop: run discovery, following runs, the alert engine, the screens.

Everything but ``app`` and its widgets is plain Python with no Textual import, shared by the
Textual app and ``lmtop --headless``.
"""
