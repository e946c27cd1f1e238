"""Telling the user: live progress and the end-of-run table (``progress``, ``summary``), memory figures
(``memory``) and the HTML run report (``report``)."""
