"""etims-agent: the offline-first KRA eTIMS edge agent that sits beside a till."""

__version__ = "0.1.0"
