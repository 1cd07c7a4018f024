"""The WSGI entry point for gunicorn: ``gunicorn billing.wsgi:app``."""

import gc

from billing.app import create_app

app = create_app()
# What the app built at import lives as long as the process: keep it out of the collector's
# sweeps, which otherwise pause requests (the authorize tail latency) to scan it again and again.
gc.freeze()
