"""Checks of a running deployment, for operators: the readiness probe behind ``/readyz`` and the
findings of ``billing doctor``. They read the database, Redis and the settings; they change
nothing."""
