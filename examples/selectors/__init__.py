"""Best-of-N scores registered from outside dabon (``scoring.plugins``)."""
