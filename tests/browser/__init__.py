"""Browser tests (Playwright driving the system's chromium).

A package so that its ``conftest.py`` is imported as ``browser.conftest``: a second
top-level module named ``conftest`` would replace ``tests/conftest.py`` in
``sys.modules`` and break the ``from conftest import ...`` of the other tests.
"""
