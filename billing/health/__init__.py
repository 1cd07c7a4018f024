"""Checks of a running deployment, for operators: the readiness probe behind ``/readyz``, the
findings of ``billing doctor`` and the gauges ``/metrics`` reads at scrape time. They read the
database, Redis and the settings; they change nothing."""
