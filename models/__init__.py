"""Reference-model recipes and corpora for tests and the demo (needs the ``dev`` extra)."""
