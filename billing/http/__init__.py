"""What both HTTP edges (billing.api and billing.web) share: the one renderer of errors and what a
view may ask of the request it serves."""
